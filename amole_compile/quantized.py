"""Quantized bases (bitsandbytes 4-bit / 8-bit, torchao): discovery on an unquantized twin.

`torch.export` cannot trace bitsandbytes' `Params4bit` / `Int8Params` under fake tensors, and a torchao weight
(a tensor subclass) is not a parameter matrix the analysis recognises. So a quantized model is planned on its
unquantized twin: the same class built from the same config (without `quantization_config`) on the meta device,
which allocates nothing. The plan's module names and features are the quantized model's, and the adapters wrap
the quantized layers themselves (they only call them), computing in the layer's compute dtype.

HF `Trainer` refuses "purely quantized models" unless the model looks like a PEFT model; a transformed quantized
model is one (it has trainable adapters), so `mark_trainable` sets the flag the Trainer reads, and
`save_pretrained` clears it while transformers writes the base model.

bitsandbytes >= 0.50, on a CPU with AVX512-BF16, repacks a 4-bit layer on its first eval no-grad forward for a
faster kernel, casting the block scales (absmax) to bf16. That is lossy and lasting: the layer then computes
differently in training too, and `save_pretrained` writes the rounded scales. `keep_stored_format` turns the
repack off on a transformed model, so training, evaluation and saving all see the base as it was loaded.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

LIBRARIES = {"bitsandbytes": "bitsandbytes", "torchao": "torchao"}  # quantization library -> pip package


class QuantizedModelError(ValueError):
    """A quantized model that cannot be handled as asked (no twin to plan on, export, missing library)."""


def library(model: nn.Module) -> str | None:
    """'bitsandbytes' / 'torchao' when `model` holds layers quantized by that library, else None."""
    for mod in model.modules():
        if type(mod).__module__.startswith("bitsandbytes"):
            return "bitsandbytes"
        w = mod.__dict__.get("_parameters", {}).get("weight")
        if w is not None and type(w).__module__.startswith("bitsandbytes"):
            return "bitsandbytes"
        if w is not None and type(w).__module__.startswith("torchao"):
            return "torchao"
        if w is not None and type(getattr(w, "data", None)).__module__.startswith("torchao"):
            return "torchao"
    return None


def require(package: str, why: str) -> None:
    """Raise a one-line error naming the package to install when it is missing."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise QuantizedModelError(f"{why} needs the `{package}` package: pip install {package}")


def twin(model: nn.Module) -> nn.Module:
    """The unquantized twin of a quantized HF model, on the meta device (same class, same config)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "_from_config"):
        lib = library(model)
        raise QuantizedModelError(
            f"{type(model).__name__} is quantized ({lib}) and is not a Hugging Face model, so it has no "
            "unquantized twin to find its attention projections on: plan an unquantized copy "
            "(`p = amole_compile.plan(unquantized)`) and pass `transform(model, config, plan=p)`")
    config = copy.deepcopy(config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):
        out = type(model)._from_config(config)
    return out.eval()


def compute_dtype(layer: nn.Module) -> torch.dtype | None:
    """The dtype a quantized layer computes in (bitsandbytes' compute_dtype, torchao's logical dtype)."""
    dt = getattr(layer, "compute_dtype", None)
    if isinstance(dt, torch.dtype) and dt.is_floating_point:
        return dt
    w = getattr(layer, "weight", None)
    if w is not None and w.dtype.is_floating_point:
        return w.dtype
    return None


def mark_trainable(model: nn.Module) -> None:
    """Let HF `Trainer` fine-tune a transformed quantized model (it refuses 'purely quantized' ones)."""
    if getattr(model, "hf_quantizer", None) is not None and not getattr(model, "_hf_peft_config_loaded", False):
        model._hf_peft_config_loaded = True
        model.__dict__["_amole_peft_flag"] = True


def unmark_trainable(model: nn.Module) -> None:
    """Undo `mark_trainable`: clear the flag that lets the HF Trainer fine-tune a quantized model."""
    if model.__dict__.pop("_amole_peft_flag", False):
        model._hf_peft_config_loaded = False


def keep_stored_format(model: nn.Module) -> None:
    """Stop bitsandbytes' lossy CPU repack of 4-bit layers (see the module docstring); warn about any layer that
    was already repacked before the transform (its block scales are already rounded to bf16)."""
    repacked = []
    for name, mod in model.named_modules():
        if getattr(mod, "support_avx512bf16_for_cpu", False):
            mod.support_avx512bf16_for_cpu = False
            mod.__dict__["_amole_repack_off"] = True  # restored by restore_format
        state = getattr(getattr(mod, "weight", None), "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            repacked.append(name)
    if repacked:
        warnings.warn(
            f"{len(repacked)} 4-bit layers (first: {repacked[0]}) were repacked by bitsandbytes for its CPU kernel "
            "by an eval forward before the transform: their block scales are rounded to bf16, so they compute "
            "and save differently from the checkpoint they were loaded from. Reload the base and transform it "
            "before any eval forward to keep it exact.", stacklevel=3)


def restore_format(model: nn.Module) -> None:
    """Undo `keep_stored_format` (untransform): bitsandbytes may repack those layers again."""
    for mod in model.modules():
        if mod.__dict__.pop("_amole_repack_off", False):
            mod.support_avx512bf16_for_cpu = True
