"""The base model a Trainer checkpoint was trained on: referenced, not copied.

A `checkpoint-N` folder the HF Trainer writes of a transformed model holds what a resume needs and nothing the
user already has: the adapters (`amole_config.json` + `adapters.safetensors`), the Trainer's optimizer,
scheduler, RNG and trainer state, and `model.safetensors` as an empty marker (the Trainer's resume looks for a
weights file by that name). The base is named in the manifest under `base`:

    {"name_or_path": str, "config": {field: value}, "samples": [{"key", "shape", "dtype", "values"}]}

`config` is the base's config without the fields that do not change the weights (`IGNORED`); `samples` are
`SAMPLES` evenly spaced values of every floating base weight and bias: a fingerprint that costs milliseconds where
hashing a 7B base would cost seconds per checkpoint, and that sees a base whose every q projection differs (an
earlier LoRA merged into it), which three sampled tensors did not. A resume compares both with
the model it resumes into and refuses another base, naming the field or the tensor. A base loaded in a lower
precision than the one saved is the same base: the saved values are cast to its dtype before the comparison.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

SAMPLES = 16  # values per tensor (a 7B Llama's ~290 tensors: ~4.6k values in the manifest)
# Config fields that describe how the base is loaded or run, not which weights it holds.
IGNORED = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype", "quantization_config",
                     "use_cache", "architectures", "output_hidden_states", "output_attentions", "return_dict",
                     "attn_implementation", "_attn_implementation", "_attn_implementation_autoset",
                     "_commit_hash", "pretraining_tp"})


class DifferentBaseError(ValueError):
    """A resume into a base model other than the one the checkpoint was trained on."""


def reference(model: nn.Module, base: Mapping[str, torch.Tensor]) -> dict:
    """The `base` entry for a checkpoint of `model`, whose base state dict (original key names) is `base`."""
    return {"name_or_path": str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
            "config": _config(model), "samples": [_sample(k, base[k]) for k in _picks(base)]}


def check_same_base(model: nn.Module, base: Mapping[str, torch.Tensor], ref: dict, folder: Path) -> None:
    """Raise DifferentBaseError, naming what differs, when `model` (base state dict `base`) is not the base
    that `ref` (a checkpoint's `base` entry) describes."""
    if not isinstance(ref, dict) or not isinstance(ref.get("samples"), list):
        raise ValueError(f"{folder}: the manifest's `base` entry is malformed: {ref!r}")
    where = f"{folder} was trained on {ref.get('name_or_path') or 'another base model'}"
    saved, now = ref.get("config") or {}, _config(model)
    fields = sorted(k for k in set(saved) | set(now) if saved.get(k, "<unset>") != now.get(k, "<unset>"))
    if fields:
        shown = "; ".join(f"{k}: {saved.get(k, '<unset>')!r} there, {now.get(k, '<unset>')!r} here"
                          for k in fields[:3])
        raise DifferentBaseError(f"resume refused: {where}, whose config differs from this model's ({shown}"
                                 f"{f'; and {len(fields) - 3} more' if len(fields) > 3 else ''}). Resume into "
                                 "the base the checkpoint was trained on")
    for entry in ref["samples"]:
        problem = _compare(entry, base.get(entry.get("key")))
        if problem:
            raise DifferentBaseError(f"resume refused: {where}, and this model's base differs from it: "
                                     f"{entry.get('key')} {problem}. Resume into the base the checkpoint was "
                                     "trained on")


# ---- the fingerprint ------------------------------------------------------------------------------------------
def _config(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return {}
    try:
        full = json.loads(config.to_json_string(use_diff=False))
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in full.items() if k not in IGNORED and not k.startswith("_")}


def _plain(t) -> bool:
    """A dense floating tensor with values here (not a quantized or sharded subclass, not on meta)."""
    return type(t) in (torch.Tensor, nn.Parameter) and t.is_floating_point() and not t.is_meta and t.numel() > 0


def _picks(base: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted(k for k, t in base.items() if k.endswith((".weight", ".bias")) and _plain(t))


def _values(t: torch.Tensor) -> torch.Tensor:
    """SAMPLES evenly spaced values of `t` (flattened), in its own dtype."""
    flat = t.detach().reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, min(SAMPLES, flat.numel())).round().long().to(flat.device)
    return flat[idx].cpu()


def _sample(key: str, t: torch.Tensor) -> dict:
    return {"key": key, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "values": _values(t).double().tolist()}  # float64 holds every fp32 / bf16 / fp16 value exactly


def _compare(entry: dict, t: torch.Tensor | None) -> str | None:
    """What differs between a saved sample and this model's tensor, or None."""
    if t is None:
        return "is not in it"
    if list(t.shape) != list(entry.get("shape", [])):
        return f"has shape {list(t.shape)} here and {entry.get('shape')} there"
    if not _plain(t):
        return None  # quantized or sharded here: the config check stands alone
    saved = torch.tensor(entry.get("values", []), dtype=torch.float64)
    now = _values(t)
    if saved.shape != now.shape or not torch.equal(saved.to(now.dtype).double(), now.double()):
        return "holds other values"
    return None
