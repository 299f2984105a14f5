"""Our adapter files, written atomically and read with strict checks of targets, method, keys and shapes:

    amole_config.json     {"format": "amole_compile", "format_version": 2, "active": name,
                           "adapters": {name: {"config": AdaMoLEConfig.to_dict(), "targets": [...]}}}
    adapters.safetensors  keys `<module>.adapters.<name>.<role>.<param>`

A version-1 directory (one unnamed adapter, keys `<module>.adapters.<role>.<param>`) reads as an adapter named
"default". The verbs `save_adapters` / `load_adapters` live in `io.py`; `pretrained.py` (save_pretrained,
Trainer checkpoints) uses these functions directly.

The names do not collide with PEFT's (`adapter_config.json`, `adapter_model.safetensors`), so a model directory
written by `save_pretrained` can hold both the base model and our adapters. Directories written before the rename
(`adapter_config.json` with `"format": "amole_compile"`) are still read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..config import AdaMoLEConfig
from ..files import atomic_write
from ..model.state import active_adapter, adapter_groups, adapter_names, adapter_state, targets
from ..passes.targets import Target, compress, expand

CONFIG_FILE = "amole_config.json"
LEGACY_CONFIG_FILE = "adapter_config.json"  # ours before the rename; PEFT's (and the upstream format's) name
WEIGHTS_FILE = "adapters.safetensors"
FORMAT = "amole_compile"
FORMAT_VERSION = 2  # 2: named adapters (keys `<module>.adapters.<name>.<role>.<param>`); 1: one, unnamed
V1_NAME = "default"  # the name a version-1 directory's adapter is read under


def name_of(key: str) -> str:
    """The adapter name in a canonical key `<module>.adapters.<name>.<role>.<param>`."""
    return key.split(".adapters.", 1)[1].split(".", 1)[0]


def names_of(state: dict[str, torch.Tensor]) -> list[str]:
    """The adapter names in canonical keys, in order of appearance."""
    return list(dict.fromkeys(map(name_of, state)))


def _slices_to_json(t: Target) -> list:
    return [{"start": s.start, "stop": s.stop} if isinstance(s, slice) else list(s) for s in t.slices]


def _target_to_json(t: Target) -> dict:
    return {"module": t.module, "roles": list(t.roles), "slices": _slices_to_json(t),
            "in_features": t.in_features, "out_features": t.out_features}


def _target_from_json(d: dict) -> Target:
    try:
        slices = tuple(slice(s["start"], s["stop"]) if isinstance(s, dict) else compress(s) for s in d["slices"])
        return Target(d["module"], tuple(d["roles"]), slices, int(d["in_features"]), int(d["out_features"]))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{CONFIG_FILE}: malformed target entry {d!r}: {exc}") from exc


def write_adapters(model: nn.Module, path: str | os.PathLike, state: dict[str, torch.Tensor]) -> Path:
    """Write the adapter tensors `state` (canonical keys, e.g. gathered from a sharded state dict) of `model`:
    every adapter the keys name, with its config and targets."""
    from safetensors.torch import save_file

    if any(v.is_meta for v in state.values()):
        raise ValueError("the adapters are on the meta device and hold no values; materialise the model first")
    names = names_of(state)
    check_state(adapter_state(model, names), state, "save_adapters")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"save_adapters: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    active = active_adapter(model)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "active": active if active in names else names[0],
            "adapters": {n: {"config": adapter_groups(model, n)[0][1].config.to_dict(),
                             "targets": [_target_to_json(t) for t in targets(model, n)]} for n in names}}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    legacy = out / LEGACY_CONFIG_FILE
    if legacy.is_file() and _is_ours(legacy):
        legacy.unlink()  # an old config of ours would make from_pretrained take the directory for a PEFT adapter
    return out


def _is_ours(file: Path) -> bool:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def has_adapters(path: Path) -> bool:
    """Does directory `path` hold adapters in our format (current or legacy file name)?"""
    return (path / CONFIG_FILE).is_file() or ((path / LEGACY_CONFIG_FILE).is_file()
                                              and _is_ours(path / LEGACY_CONFIG_FILE))


def read_adapter_tensors(model: nn.Module, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapter tensors in `path` (our format) for every adapter the transformed `model` holds, checked
    against it (targets, method, keys, shapes): canonical key -> tensor."""
    path = Path(path)
    data, file = read_config_json(path)
    saved, tensors = read_ours(path, data, file)
    names = adapter_names(model)
    for name in names:
        if name not in saved:
            raise ValueError(f"{path} holds adapters {list(saved)}, not the model's {name!r}")
        config, want = saved[name]
        same_targets(targets(model, name), want)
        same_math(adapter_groups(model, name)[0][1].config, config)
    expected = adapter_state(model)
    tensors = {k: v for k, v in tensors.items() if name_of(k) in names}
    check_state(expected, tensors, str(path))
    return tensors


def read_config_json(path: Path) -> tuple[dict, Path]:
    """An adapter directory -> (its config JSON, the file): ours (`amole_config.json`), else
    `adapter_config.json` (ours before the rename, or the upstream / PEFT format)."""
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {path}")
    file = path / CONFIG_FILE
    if not file.is_file():
        file = path / LEGACY_CONFIG_FILE
    if not file.is_file():
        hint = (" (it holds a model: save_pretrained of a model without adapters, or of a base model)"
                if (path / "config.json").is_file() else "")
        raise FileNotFoundError(f"no {CONFIG_FILE} (nor {LEGACY_CONFIG_FILE}) in {path}: not an adapter "
                                f"directory{hint}")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return data, file


def read_ours(path: Path, data: dict, file: Path | None = None
              ) -> tuple[dict[str, tuple[AdaMoLEConfig, list[Target]]], dict[str, torch.Tensor]]:
    """Our config JSON `data` and the weights file in `path` -> ({name: (config, targets)}, tensors by canonical
    key). A version-1 directory (one unnamed adapter) reads as one adapter named "default"."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    version = data.get("format_version", 1)
    if data.get("format") != FORMAT or not ("adapters" in data if version >= 2 else
                                            "config" in data and "targets" in data):
        raise ValueError(f"{file or path} is neither an amole_compile nor an upstream (peft_type) config")
    if version > FORMAT_VERSION:
        raise ValueError(f"{file or path} has format_version {version}; this amole_compile reads up to "
                         f"{FORMAT_VERSION}: upgrade amole_compile")
    entries = data["adapters"] if version >= 2 else {V1_NAME: data}
    try:
        saved = {n: (AdaMoLEConfig.from_dict(e["config"]), [_target_from_json(t) for t in e["targets"]])
                 for n, e in entries.items()}
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{file or path}: malformed adapter entry: {exc!r}") from exc
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights} is not a readable safetensors file: {exc}") from exc
    if version < 2:  # `<module>.adapters.<role>.<param>` -> `<module>.adapters.default.<role>.<param>`
        tensors = {k.replace(".adapters.", f".adapters.{V1_NAME}.", 1): v for k, v in tensors.items()}
    return saved, tensors


def saved_active(data: dict) -> str | None:
    """The adapter that was active when the directory was written (version 2), else None."""
    return data.get("active") if data.get("format_version", 1) >= 2 else None


def rename(tensors: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    """Adapter `old`'s tensors, keyed as adapter `new`'s."""
    mark = f".adapters.{old}."
    return {k.replace(mark, f".adapters.{new}.", 1): v for k, v in tensors.items() if mark in k}


def same_targets(have: list[Target], want: list[Target]) -> None:
    """ValueError naming the first module where the model's targets and the file's differ."""
    norm = {t.module: (t.roles, [expand(s) for s in t.slices], t.in_features, t.out_features) for t in have}
    for t in want:
        got = norm.pop(t.module, None)
        if got is None:
            raise ValueError(f"the adapters adapt {t.module}, which this model does not have as an attention "
                             "projection (or it was filtered out)")
        if got != (t.roles, [expand(s) for s in t.slices], t.in_features, t.out_features):
            raise ValueError(f"{t.module}: the adapters expect roles {t.roles} with {t.in_features}->"
                             f"{t.out_features}; the model has roles {got[0]} with {got[2]}->{got[3]}")
    if norm:
        raise ValueError(f"the model adapts {sorted(norm)[0]} (and {len(norm) - 1} more) but the adapters do not")


def check_state(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: str) -> None:
    """ValueError naming the first missing or unexpected key, or the first shape mismatch."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    for key, p in expected.items():
        if tuple(tensors[key].shape) != tuple(p.shape):
            raise ValueError(f"{source}: {key!r} has shape {tuple(tensors[key].shape)}, "
                             f"the model expects {tuple(p.shape)}")


def same_math(have: AdaMoLEConfig, want: AdaMoLEConfig) -> None:
    """ValueError naming every setting (method, experts, rank, scale, ...) where the two configs differ."""
    def key(c: AdaMoLEConfig) -> dict:
        return {"method": c.method, "num_experts": c.num_experts, "rank": c.rank, "scale": c.scale,
                "max_threshold": c.threshold_cap, "top_k": c.k}

    diff = {k: (v, key(want)[k]) for k, v in key(have).items() if key(want)[k] != v}
    if diff:
        raise ValueError("the model's adapters and the file's differ in " +
                         ", ".join(f"{k} (model {a!r}, file {b!r})" for k, (a, b) in diff.items()))
