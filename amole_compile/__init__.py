"""amole_compile: AdaMoLE adapters (an adaptive mixture of LoRA experts) on the attention projections a graph
pass finds in any PyTorch model, trained under torch.compile and served with onnxruntime.

    model = amole_compile.transform(model, amole_compile.AdaMoLEConfig(num_experts=8, rank=4))
    loss = model(input_ids=ids, labels=ids).loss   # task loss + aux_loss_coef (1e-3) * the aux loss

Importing this package imports no triton, torch._inductor, onnx, onnxscript, onnxruntime or matplotlib, and
does not touch CUDA: the op registers on first use, and the export, statistics and HF helpers load lazily.
"""

from __future__ import annotations

import warnings

from .checkpoint.io import load_adapters, save_adapters
from .config import AdaMoLEConfig
from .core import (
    DeadAdapterError,
    NoAttentionFound,
    active_adapter,
    adapter_names,
    aux_loss,
    batch_adapters,
    delete_adapter,
    is_transformed,
    plan,
    set_active_adapter,
    targets,
    transform,
    untransform,
)
from .integrations.foreign import ForeignAdaptersError
from .passes.capture import CaptureError
from .passes.swap_modules import UnsupportedLayerError
from .passes.targets import Plan, Skip, Target

__version__ = "0.1.0"

# Heavy optional parts (onnx, onnxruntime, matplotlib, transformers' Trainer) load on first use.
_LAZY = {
    "export_onnx": "amole_compile.export.onnx",
    "OnnxLM": "amole_compile.export.runtime",
    "OnnxExportError": "amole_compile.export.onnx",
    "expert_stats": "amole_compile.stats",
    "reset_expert_stats": "amole_compile.stats",
    "plot_expert_stats": "amole_compile.stats",
    "base_state_dict": "amole_compile.checkpoint.pretrained",
}
# Retired names: still importable, each with a DeprecationWarning naming what replaces it.
_RETIRED = {
    "compute_loss": ("amole_compile.integrations.trainer", "model(**inputs).loss (it holds the aux loss)"),
    "AdaMoLETrainer": ("amole_compile.integrations.trainer", "transformers.Trainer"),
    "atomic_write": ("amole_compile.files", "amole_compile.files.atomic_write (an internal helper)"),
}

__all__ = [
    "AdaMoLEConfig", "CaptureError", "DeadAdapterError", "ForeignAdaptersError", "NoAttentionFound", "OnnxExportError",
    "OnnxLM", "Plan", "Skip", "Target", "UnsupportedLayerError", "active_adapter", "adapter_names", "aux_loss",
    "base_state_dict", "batch_adapters", "delete_adapter", "expert_stats", "export_onnx", "is_transformed",
    "load_adapters", "plan", "plot_expert_stats", "reset_expert_stats", "save_adapters", "set_active_adapter",
    "targets", "transform", "untransform",
]


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _RETIRED:
        module, instead = _RETIRED[name]
        warnings.warn(f"amole_compile.{name} is retired and leaves the public API; use {instead}",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'amole_compile' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
