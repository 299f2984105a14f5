"""amole_compile: AdaMoLE adapters (an adaptive mixture of LoRA experts) on the attention projections a graph
pass finds in any PyTorch model, trained under torch.compile and served with onnxruntime.

    model = amole_compile.transform(model, amole_compile.AdaMoLEConfig(num_experts=8, rank=4))
    loss = model(input_ids=ids, labels=ids).loss   # task loss + aux_loss_coef (1e-3) * the aux loss

Importing this package imports no triton, torch._inductor, onnx, onnxscript, onnxruntime or matplotlib, and
does not touch CUDA: the op registers on first use, and the export, statistics and HF helpers load lazily.
"""

from __future__ import annotations

from .adapters_io import load_adapters, save_adapters
from .config import AdaMoLEConfig
from .core import NoAttentionFound, aux_loss, is_transformed, plan, targets, transform, untransform
from .files import atomic_write
from .named import active_adapter, adapter_names, batch_adapters, delete_adapter, set_active_adapter
from .passes.capture import CaptureError
from .passes.swap_modules import UnsupportedLayerError
from .passes.targets import Plan, Target

__version__ = "0.1.0"

# Heavy optional parts (onnx, onnxruntime, matplotlib) load on first use.
_LAZY = {
    "export_onnx": "amole_compile.export.onnx",
    "OnnxLM": "amole_compile.export.runtime",
    "expert_stats": "amole_compile.stats",
    "reset_expert_stats": "amole_compile.stats",
    "plot_expert_stats": "amole_compile.stats",
    "base_state_dict": "amole_compile.hf",
    "compute_loss": "amole_compile.hf",
    "AdaMoLETrainer": "amole_compile.hf",
    "OnnxExportError": "amole_compile.export.onnx",
}

__all__ = [
    "AdaMoLEConfig", "AdaMoLETrainer", "CaptureError", "NoAttentionFound", "OnnxExportError", "OnnxLM", "Plan",
    "Target", "UnsupportedLayerError", "active_adapter", "adapter_names", "atomic_write", "aux_loss",
    "base_state_dict", "batch_adapters", "compute_loss", "delete_adapter", "expert_stats", "export_onnx",
    "is_transformed", "load_adapters", "plan", "plot_expert_stats", "reset_expert_stats", "save_adapters",
    "set_active_adapter", "targets", "transform", "untransform",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'amole_compile' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
