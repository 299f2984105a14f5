"""Quantized bases (bitsandbytes 4-bit / 8-bit, torchao): discovery on an unquantized twin.

`torch.export` cannot trace bitsandbytes' `Params4bit` / `Int8Params` under fake tensors, and a torchao weight
(a tensor subclass) is not a parameter matrix the analysis recognises. So a quantized model is planned on its
unquantized twin: the same class built from the same config (without `quantization_config`) on the meta device,
which allocates nothing. The plan's module names and features are the quantized model's, and the adapters wrap
the quantized layers themselves (they only call them), computing in the layer's compute dtype.

What a transformed quantized model needs patched in transformers and bitsandbytes (the Trainer's PEFT flag,
bitsandbytes' lossy CPU repack) is in the patch table, `patches.py`; `cpu_repacked` and `undo_cpu_repack` below
put back a layer that bitsandbytes repacked before the transform.
"""

from __future__ import annotations

import copy

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


# ---- bitsandbytes' CPU repack (bitsandbytes >= 0.50 on CPUs with AVX512-BF16) ------------------------------------
def cpu_repacked(layer: nn.Module) -> bool:
    """Has bitsandbytes repacked this 4-bit layer for its CPU kernel (its first eval forward without grad)?"""
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def undo_cpu_repack(layer: nn.Module) -> None:
    """Put a 4-bit layer that bitsandbytes repacked for its CPU kernel back in bitsandbytes' standard layout. It
    then computes with the block scales the repack rounded to bf16 (the exact ones are gone), held in float32
    in block order: exactly what the same checkpoint gives with its scales rounded to bf16.

    Why a repacked layer cannot stay (bitsandbytes 0.50.2): it computes through `gemv_4bit`, which has no
    backward, so no gradient flows through it to the layers below (their adapters train on a wrong gradient);
    and the first `state_dict()` (save_pretrained, every Trainer checkpoint) unpacks it in place with
    `_convert_weight_packed_for_cpu_inverse`, which leaves an unnested state's scales transposed
    ([in / blocksize, out] instead of block order): from then on each block of a layer whose input spans more
    than one block reads another block's scale, in the live model and in what is saved (2e-2 on a tiny Llama's
    logits). A double-quantized state comes back re-quantized by bitsandbytes' own inverse."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight = layer.weight
    state = weight.quant_state
    nested, scales = state.original_nested, state.absmax  # scales: [in / blocksize, out] bf16
    data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    if not nested:
        state.absmax = scales.T.reshape(-1).float()  # block order, as quantize_4bit wrote it
    weight.data = data
