"""amole_compile: AdaMoLE adapters (an adaptive mixture of LoRA experts) on the attention projections a graph
pass finds in any PyTorch model, trained under torch.compile and served with onnxruntime.

    model = amole_compile.transform(model, amole_compile.AdaMoLEConfig(num_experts=8, rank=4))
    loss = model(input_ids=ids, labels=ids).loss   # task loss + aux_loss_coef (1e-3) * the aux loss

Importing this package imports nothing else, not even torch: each public name loads its module on first use
(`amole-compile` checks its arguments in well under a second). Nothing imports triton, torch._inductor, onnx,
onnxscript, onnxruntime or matplotlib, or touches CUDA, until it is needed: the op registers on first use.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_PUBLIC = {  # name -> the module that defines it, loaded on first use
    "AdaMoLEConfig": "config",
    "plan": "core", "transform": "core", "untransform": "core", "targets": "core", "aux_loss": "core",
    "is_transformed": "core", "adapter_names": "core", "active_adapter": "core", "set_active_adapter": "core",
    "delete_adapter": "core", "batch_adapters": "core", "NoAttentionFound": "core",
    "load_adapters": "checkpoint.io", "save_adapters": "checkpoint.io", "base_state_dict": "checkpoint.pretrained",
    "expert_stats": "stats", "reset_expert_stats": "stats", "plot_expert_stats": "stats",
    "export_onnx": "export.onnx", "OnnxExportError": "export.onnx", "OnnxLM": "export.runtime",
    "Plan": "passes.targets", "Skip": "passes.targets", "Target": "passes.targets",
    "CaptureError": "passes.capture", "UnsupportedLayerError": "passes.swap_modules",
    "ForeignAdaptersError": "integrations.foreign", "DeadAdapterError": "core",
    "DifferentBaseError": "checkpoint.base_ref",
}
# Retired names: still importable, each with a DeprecationWarning naming what replaces it.
_RETIRED = {
    "compute_loss": ("integrations.trainer", "model(**inputs).loss (it holds the aux loss)"),
    "AdaMoLETrainer": ("integrations.trainer", "transformers.Trainer"),
    "atomic_write": ("files", "amole_compile.files.atomic_write (an internal helper)"),
}
_SUBPACKAGES = ("checkpoint", "cli", "config", "core", "export", "files", "integrations", "kernels", "model",
                "passes", "stats")

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ loads each name
    from .checkpoint.io import load_adapters, save_adapters
    from .config import AdaMoLEConfig
    from .core import (
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

__all__ = [
    "AdaMoLEConfig", "CaptureError", "DeadAdapterError", "DifferentBaseError", "ForeignAdaptersError",
    "NoAttentionFound", "OnnxExportError", "OnnxLM", "Plan", "Skip", "Target", "UnsupportedLayerError",
    "active_adapter", "adapter_names", "aux_loss", "base_state_dict", "batch_adapters", "delete_adapter",
    "expert_stats", "export_onnx", "is_transformed", "load_adapters", "plan", "plot_expert_stats",
    "reset_expert_stats", "save_adapters", "set_active_adapter", "targets", "transform", "untransform"
]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
        globals()[name] = value
        return value
    if name in _RETIRED:
        module, instead = _RETIRED[name]
        warnings.warn(f"amole_compile.{name} is retired and leaves the public API; use {instead}",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'amole_compile' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
