"""Our adapter files, written as one transaction and read with strict checks of fields, targets, method, keys,
shapes and values:

    amole_config.json     {"format": "amole_compile", "format_version": 2, "active": name or null, "model_type": str,
                           "weights": {"file": "adapters.safetensors", "size": bytes, "sha256": hex},
                           "adapters": {name: {"config": AdaMoLEConfig.to_dict(), "targets": [...]}},
                           "base": {...}}  (Trainer checkpoints only: the base they reference, base_ref.py)
    adapters.safetensors  keys `<module>.adapters.<name>.<role>.<param>`

The config is the manifest: it names the weights file with its size and hash, and is renamed into place last
(`files.commit_pair`), so a reader who follows it gets the old save or the new one; a weights file that does not
match (another save's, edited, or replaced while being read) is read again, then refused. Folders written
before the manifest (no `weights` entry) are read as they are. A version-1 directory (one unnamed adapter, keys
`<module>.adapters.<role>.<param>`) reads as an adapter named "default". The verbs `save_adapters` /
`load_adapters` live in `io.py`; `pretrained.py` (save_pretrained, Trainer checkpoints) uses these functions.

The names do not collide with PEFT's (`adapter_config.json`, `adapter_model.safetensors`), so a model directory
written by `save_pretrained` can hold both the base model and our adapters. Directories written before the rename
(`adapter_config.json` with `"format": "amole_compile"`) are still read.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from ..config import AdaMoLEConfig
from ..files import clean_leftovers, commit_pair, folder_lock
from ..model.state import active_adapter, adapter_groups, adapter_names, adapter_state, targets
from ..passes.targets import Target, compress, expand
from .schema import FORMAT, FORMAT_VERSION, check_ours, check_values, model_type

CONFIG_FILE = "amole_config.json"
LEGACY_CONFIG_FILE = "adapter_config.json"  # ours before the rename; PEFT's (and the upstream format's) name
WEIGHTS_FILE = "adapters.safetensors"
V1_NAME = "default"  # the name a version-1 directory's adapter is read under
T = TypeVar("T")


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


def _entry(config: AdaMoLEConfig, want: list[Target]) -> dict:
    return {"config": config.to_dict(), "targets": [_target_to_json(t) for t in want]}


# ---- write ------------------------------------------------------------------------------------------------------
def write_adapters(model: nn.Module, path: str | os.PathLike, state: dict[str, torch.Tensor], *,
                   keep_others: bool = False, overwrite: bool = False, base: dict | None = None) -> Path:
    """Write the adapter tensors `state` (canonical keys, e.g. gathered from a sharded state dict) of `model`:
    every adapter the keys name, with its config and targets, as one transaction (`files.commit_pair`).

    keep_others   the folder's other adapters stay (read, checked and written again beside the new ones)
    overwrite     replace an `amole_config.json` / `adapters.safetensors` that is not ours, or ours that cannot
                  be read (else refused)
    base          the base model the adapters were trained on, referenced instead of saved (a Trainer
                  checkpoint: `base_ref.reference`), kept in the manifest under `base`
    """
    if any(v.is_meta for v in state.values()):
        raise ValueError("the adapters are on the meta device and hold no values; materialise the model first")
    names = names_of(state)
    check_state(adapter_state(model, names), state, "save_adapters")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"save_adapters: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    entries = {n: _entry(adapter_groups(model, n)[0][1].config, targets(model, n)) for n in names}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    active = active_adapter(model)
    with folder_lock(out):
        if not overwrite:
            refuse_foreign(out)
        kept, kept_tensors, kept_active = _others(out, names, overwrite) if keep_others else ({}, {}, None)
        entries.update(kept)
        tensors.update(kept_tensors)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "active": None if active is None else next(a for a in (active, kept_active, names[0]) if a in entries)}
        if model_type(model):
            meta["model_type"] = model_type(model)
        if base is not None:
            meta["base"] = base
        _commit(out, meta | {"adapters": entries}, tensors)
        clean_leftovers(out, WEIGHTS_FILE)  # staging folders of writers before the manifest
        legacy = out / LEGACY_CONFIG_FILE
        if legacy.is_file() and is_ours(legacy):
            legacy.unlink()  # an old config of ours would make from_pretrained take the directory for a PEFT adapter
    return out


def _commit(out: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write the weights, then the config naming them with their size and hash, as one transaction."""
    from safetensors.torch import save_file

    manifest: dict = {}

    def write(config: Path, weights_name: str) -> None:
        weights = config.parent / weights_name
        save_file(tensors, str(weights), metadata={"format": "pt"})
        manifest.update(size=weights.stat().st_size, sha256=_sha256(weights.read_bytes()))
        write_config(None, config, weights_name)

    def write_config(_old, config: Path, weights_name: str) -> None:
        config.write_text(json.dumps(meta | {"weights": {"file": weights_name, **manifest}}, indent=2))

    commit_pair(out / CONFIG_FILE, out / WEIGHTS_FILE, write, write_config)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def refuse_foreign(out: Path) -> None:
    """FileExistsError when `out` holds an `amole_config.json` that is not ours, or an `adapters.safetensors`
    that no config of ours names and whose keys are not adapter keys: a save would replace someone's file."""
    config, weights = out / CONFIG_FILE, out / WEIGHTS_FILE
    if config.exists() and not is_ours(config):
        raise FileExistsError(f"{config} exists and is not an amole_compile config: not replaced (save elsewhere, "
                              "or pass overwrite=True to replace it)")
    if weights.exists() and not has_adapters(out) and not _adapter_keys_only(weights):
        raise FileExistsError(f"{weights} exists and holds no amole_compile adapters: not replaced (save "
                              "elsewhere, or pass overwrite=True to replace it)")


def _adapter_keys_only(file: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            return all(".adapters." in k for k in f.keys())
    except Exception:  # not a safetensors file at all
        return False


def _others(out: Path, names: list[str], overwrite: bool) -> tuple[dict, dict[str, torch.Tensor], str | None]:
    """The adapters of folder `out` not among `names`: (entries, tensors, the folder's active adapter); none
    where the folder's adapters cannot be read and `overwrite` says to replace them."""
    if not has_adapters(out):
        return {}, {}, None
    try:
        data, saved, tensors = reread(lambda: read_saved(out))
    except (OSError, ValueError) as exc:
        if overwrite:
            return {}, {}, None
        raise ValueError(f"save_adapters: cannot keep the other adapters of {out}: {exc}. Pass overwrite=True to "
                         "replace its adapter files") from exc
    keep = [n for n in saved if n not in names]
    return ({n: _entry(*saved[n]) for n in keep}, {k: v for k, v in tensors.items() if name_of(k) in keep},
            saved_active(data))


def is_ours(file: Path) -> bool:
    """Is `file` a config of ours (JSON with our `format`)?"""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def has_adapters(path: Path) -> bool:
    """Does directory `path` hold adapters in our format (current or legacy file name)?"""
    return (path / CONFIG_FILE).is_file() or ((path / LEGACY_CONFIG_FILE).is_file()
                                              and is_ours(path / LEGACY_CONFIG_FILE))


# ---- read -------------------------------------------------------------------------------------------------------
class _Changed(Exception):
    """The weights file the config names is missing or does not match it: perhaps a save replaced it while it
    was read; `reread` reads the folder again, and raises `error` the last time."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def reread(read: Callable[[], T], attempts: int = 3) -> T:
    """`read()`, again (config first) while the weights it found did not match the config."""
    for attempt in range(attempts):
        try:
            return read()
        except _Changed as changed:
            if attempt == attempts - 1:
                raise changed.error from None
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def read_saved(path: Path) -> tuple[dict, dict[str, tuple[AdaMoLEConfig, list[Target]]], dict[str, torch.Tensor]]:
    """Our folder `path` -> (its config JSON, {name: (config, targets)}, tensors by canonical key). Raises
    `_Changed` for `reread` when the weights do not match the config."""
    data, file = read_config_json(path)
    saved, tensors = read_ours(path, data, file)
    return data, saved, tensors


def read_adapter_tensors(model: nn.Module, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapter tensors in `path` (our format) for every adapter the transformed `model` holds, checked
    against it (targets, method, keys, shapes, and the adapter that trained: a resume into the model running
    another would train that one with the other's optimizer state): canonical key -> tensor."""
    path = Path(path)
    data, saved, tensors = reread(lambda: read_saved(path))
    trained, runs = saved_active(data), active_adapter(model)
    if trained is not None and trained != runs:
        raise ValueError(f"the checkpoint {path} trained adapter {trained!r}, but the model being loaded runs "
                         f"{runs!r}: resuming would go on training {runs!r} with {trained!r}'s optimizer state. "
                         f"Call amole_compile.set_active_adapter(model, {trained!r}) first")
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
    check_values(expected, tensors, str(path))
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
        raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data, file


def read_ours(path: Path, data: dict, file: Path | None = None
              ) -> tuple[dict[str, tuple[AdaMoLEConfig, list[Target]]], dict[str, torch.Tensor]]:
    """Our config JSON `data` and the weights file it names in `path` -> ({name: (config, targets)}, tensors by
    canonical key). A version-1 directory (one unnamed adapter) reads as one adapter named "default"."""
    file = file or path / CONFIG_FILE
    version = check_ours(data, file)
    entries = data["adapters"] if version >= 2 else {V1_NAME: data}
    saved = {}
    for name, entry in entries.items():
        try:
            config = AdaMoLEConfig.from_dict(entry["config"])
        except (TypeError, ValueError) as exc:
            where = f"adapters[{name!r}].config" if version >= 2 else "config"
            raise ValueError(f"{file}: {where}: {exc}") from exc
        saved[name] = (config, [_target_from_json(t) for t in entry["targets"]])
    tensors = _read_weights(path, data.get("weights"), file)
    if version < 2:  # `<module>.adapters.<role>.<param>` -> `<module>.adapters.default.<role>.<param>`
        tensors = {k.replace(".adapters.", f".adapters.{V1_NAME}.", 1): v for k, v in tensors.items()}
    return saved, tensors


def _read_weights(path: Path, manifest: dict | None, file: Path) -> dict[str, torch.Tensor]:
    """The tensors of the weights file `manifest` names (checked against its size and hash), or of
    `adapters.safetensors` for a folder written before the manifest."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    weights = path / (manifest["file"] if manifest else WEIGHTS_FILE)
    try:
        data = weights.read_bytes()
    except FileNotFoundError:
        missing = FileNotFoundError(f"{weights} not found")
        raise (_Changed(missing) if manifest else missing) from None
    except OSError as exc:
        raise ValueError(f"{weights} is not a readable safetensors file: {exc}") from exc
    if manifest and (len(data), _sha256(data)) != (manifest["size"], manifest["sha256"]):
        raise _Changed(ValueError(
            f"{weights} ({len(data)} bytes, sha256 {_sha256(data)[:12]}...) is not the file {file.name} names "
            f"({manifest['size']} bytes, sha256 {manifest['sha256'][:12]}...): the two come from different saves "
            f"(copied or edited by hand?). Save the adapters again, or delete the `weights` entry of {file.name} "
            "to read the file unchecked"))
    try:
        return load(data)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{weights} is not a readable safetensors file: {exc}") from exc


def saved_active(data: dict) -> str | None:
    """The adapter that was active when the directory was written (version 2), else None."""
    return data.get("active") if data.get("format_version", 1) >= 2 else None


def saved_none_active(data: dict) -> bool:
    """Did the model written run no adapter (`"active": null`, version 2; an absent entry says nothing)?"""
    return data.get("format_version", 1) >= 2 and "active" in data and data["active"] is None


def rename(tensors: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    """Adapter `old`'s tensors, keyed as adapter `new`'s."""
    mark = f".adapters.{old}."
    return {k.replace(mark, f".adapters.{new}.", 1): v for k, v in tensors.items() if mark in k}


# ---- checks -----------------------------------------------------------------------------------------------------
def _columns(t: Target) -> str:
    return ", ".join(f"{r} {s.start}:{s.stop}" if isinstance(s, slice) else f"{r} {list(s)}"
                     for r, s in zip(t.roles, t.slices, strict=True))


def same_targets(have: list[Target], want: list[Target]) -> None:
    """ValueError naming the first module where the model's targets and the file's differ."""
    norm = {t.module: t for t in have}
    for t in want:
        got = norm.pop(t.module, None)
        if got is None:
            raise ValueError(f"the adapters adapt {t.module}, which this model does not have as an attention "
                             "projection (or it was filtered out)")
        if (got.roles, got.in_features, got.out_features) != (t.roles, t.in_features, t.out_features):
            raise ValueError(f"{t.module}: the adapters expect roles {t.roles} with {t.in_features}->"
                             f"{t.out_features}; the model has roles {got.roles} with {got.in_features}->"
                             f"{got.out_features}")
        if [expand(s) for s in got.slices] != [expand(s) for s in t.slices]:
            raise ValueError(f"{t.module}: the adapters expect the output columns {_columns(t)}; the model's "
                             f"roles own the columns {_columns(got)}")
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
