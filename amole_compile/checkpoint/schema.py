"""Checks on load: the fields of our `amole_config.json`, the tensors of a checkpoint, and the model they go to.

Every error names the file, the field (`adapters['default'].targets[2].slices[0]`) and the value it found:

    format / format_version       "amole_compile"; a positive integer, at most the version this package reads
    adapters                      a non-empty object {name: {"config": {...}, "targets": [...]}}
    active                        one of the adapters' names (or absent)
    weights                       {"file": "adapters[.<16 hex>].safetensors", "size": int, "sha256": 64 hex}
    model_type                    a string (the HF `config.model_type` the adapters were saved from)
    targets[i]                    module, roles, slices (one per role), in_features, out_features

Tensors must be floating point and finite; a load that lowers their precision (float32 into bfloat16) warns,
as does loading adapters into a model of another `model_type`.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import nn

FORMAT = "amole_compile"
FORMAT_VERSION = 2  # 2: named adapters (keys `<module>.adapters.<name>.<role>.<param>`); 1: one, unnamed
WEIGHTS_NAME = re.compile(r"adapters(\.[0-9a-f]{16})?\.safetensors")
SHA256 = re.compile(r"[0-9a-f]{64}")


class AdapterLoadWarning(UserWarning):
    """A checkpoint loads, but not as saved: lower precision, or a model of another type."""


def _show(value) -> str:
    """A value for an error message, shortened."""
    text = repr(value)
    return f"{type(value).__name__} {text[:77] + '...' if len(text) > 80 else text}"


def _fail(file, field: str, want: str, value) -> ValueError:
    return ValueError(f"{file}: {field} must be {want}, got {_show(value)}")


def _is_int(value, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_ours(data: dict, file) -> int:
    """Check our config JSON `data` (read from `file`) field by field -> its format_version."""
    if data.get("format") != FORMAT:
        raise ValueError(f"{file} is neither an amole_compile nor an upstream (peft_type) config")
    version = data.get("format_version", 1)
    if not _is_int(version, 1):
        raise _fail(file, "format_version", f"a positive integer (this amole_compile writes {FORMAT_VERSION})",
                    version)
    if version > FORMAT_VERSION:
        raise ValueError(f"{file} has format_version {version}; this amole_compile reads up to {FORMAT_VERSION}: "
                         "upgrade amole_compile")
    if version == 1:
        _check_entry(data, "the file", file)
    else:
        _check_adapters(data, file)
    if data.get("weights") is not None:
        _check_weights(data["weights"], file)
    if data.get("model_type") is not None and not isinstance(data["model_type"], str):
        raise _fail(file, "model_type", "a string", data["model_type"])
    if data.get("base") is not None and not (isinstance(data["base"], dict)
                                             and isinstance(data["base"].get("samples"), list)):
        raise _fail(file, "base", "an object {name_or_path, config, samples: [...]} (base_ref.py)", data["base"])
    return version


def _check_adapters(data: dict, file) -> None:
    if "adapters" not in data:
        raise ValueError(f"{file}: no `adapters` field (format_version {data.get('format_version')} keeps the "
                         "adapters under `adapters`: {name: {config, targets}})")
    entries = data["adapters"]
    if not isinstance(entries, dict):
        raise _fail(file, "adapters", "an object {name: {config, targets}}", entries)
    if not entries:
        raise ValueError(f"{file}: adapters is empty ({{}}): the file names no adapter")
    for name, entry in entries.items():
        _check_entry(entry, f"adapters[{name!r}]", file)
    active = data.get("active")
    if active is not None and active not in entries:
        raise _fail(file, "active", f"one of the adapters {list(entries)}", active)


def _check_entry(entry, where: str, file) -> None:
    if not isinstance(entry, dict):
        raise _fail(file, where, "an object {config, targets}", entry)
    for key, kind, want in (("config", dict, "an object (AdaMoLEConfig.to_dict())"), ("targets", list, "a list")):
        if key not in entry:
            raise ValueError(f"{file}: {where}.{key} is missing")
        if not isinstance(entry[key], kind):
            raise _fail(file, f"{where}.{key}", want, entry[key])
    for i, target in enumerate(entry["targets"]):
        check_target(target, f"{where}.targets[{i}]", file)


def check_target(t, where: str, file) -> None:
    """One saved target: {module, roles, slices (one per role: {start, stop} or a list of columns), in_features,
    out_features}."""
    if not isinstance(t, dict):
        raise _fail(file, where, "an object {module, roles, slices, in_features, out_features}", t)
    for key in ("module", "roles", "slices", "in_features", "out_features"):
        if key not in t:
            raise ValueError(f"{file}: {where}.{key} is missing")
    if not isinstance(t["module"], str) or not t["module"]:
        raise _fail(file, f"{where}.module", "a module name", t["module"])
    roles = t["roles"]
    if not isinstance(roles, list) or not roles or not all(isinstance(r, str) and r for r in roles):
        raise _fail(file, f"{where}.roles", "a non-empty list of role names", roles)
    for key in ("in_features", "out_features"):
        if not _is_int(t[key], 1):
            raise _fail(file, f"{where}.{key}", "a positive integer", t[key])
    slices = t["slices"]
    if not isinstance(slices, list) or len(slices) != len(roles):
        raise _fail(file, f"{where}.slices", f"a list of {len(roles)} column sets (one per role {roles})", slices)
    for i, cols in enumerate(slices):
        _check_columns(cols, f"{where}.slices[{i}]", file, t["out_features"])


def _check_columns(cols, where: str, file, width: int) -> None:
    if isinstance(cols, dict):
        start, stop = cols.get("start"), cols.get("stop")
        if set(cols) != {"start", "stop"} or not _is_int(start) or not _is_int(stop) or not start < stop <= width:
            raise _fail(file, where, f"{{start, stop}} with 0 <= start < stop <= out_features ({width})", cols)
    elif not isinstance(cols, list) or not cols or not all(_is_int(c) and c < width for c in cols):
        raise _fail(file, where, f"{{start, stop}} or a non-empty list of columns below out_features ({width})",
                    cols)


def _check_weights(weights, file) -> None:
    if not isinstance(weights, dict):
        raise _fail(file, "weights", "an object {file, size, sha256}", weights)
    name, size, digest = weights.get("file"), weights.get("size"), weights.get("sha256")
    if not isinstance(name, str) or not WEIGHTS_NAME.fullmatch(name):
        raise _fail(file, "weights.file", "adapters.safetensors (or adapters.<16 hex>.safetensors)", name)
    if not _is_int(size):
        raise _fail(file, "weights.size", "a byte count", size)
    if not isinstance(digest, str) or not SHA256.fullmatch(digest):
        raise _fail(file, "weights.sha256", "64 lowercase hex digits", digest)


# ---- tensors and model --------------------------------------------------------------------------------------
def check_values(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: str) -> None:
    """ValueError naming the first tensor that is not floating point or holds NaN / inf; a warning when loading
    lowers the precision (the file's dtype into a coarser dtype of the model's parameter). Keys are checked
    already (`format.check_state`)."""
    lossy = []
    for key, param in expected.items():
        t = tensors[key]
        if not t.is_floating_point():
            raise ValueError(f"{source}: {key!r} has dtype {t.dtype}; adapter tensors are floating point")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(f"{source}: {key!r} holds {bad} non-finite value(s) (NaN or inf) of {t.numel()}")
        if param.is_floating_point() and _drops(t.dtype, param.dtype):
            lossy.append((key, t.dtype, param.dtype))
    if lossy:
        key, have, want = lossy[0]
        warnings.warn(f"{source}: {len(lossy)} adapter tensor(s) lose precision on load: {key!r} is {have} in the "
                      f"file and {want} in the model", AdapterLoadWarning, stacklevel=3)


def _drops(src: torch.dtype, dst: torch.dtype) -> bool:
    """Does casting `src` to `dst` lose precision or range?"""
    if src == dst:
        return False
    a, b = torch.finfo(src), torch.finfo(dst)
    return b.eps > a.eps or b.max < a.max or b.tiny > a.tiny


def model_type(model: nn.Module) -> str | None:
    """The HF `config.model_type` of `model` (None for a model without one)."""
    value = getattr(getattr(model, "config", None), "model_type", None)
    return value if isinstance(value, str) and value else None


def check_model_type(model: nn.Module, saved: str | None, source: str | Path) -> None:
    """Warn when the adapters in `source` were saved from a model of another `model_type`."""
    have = model_type(model)
    if saved and have and saved != have:
        warnings.warn(f"{source} holds adapters saved from a {saved!r} model; loading them into a {have!r} model "
                      "(the targets and shapes match)", AdapterLoadWarning, stacklevel=3)
