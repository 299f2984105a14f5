"""The checkpoint verbs: `save_adapters` / `load_adapters`.

They write and read our files (`format.py` describes them) and the upstream repository's checkpoints
(`upstream.py`, docs/upstream_format.md). A save is one transaction (a reader sees the old save or the new one);
fields, keys, shapes and values are checked strictly on load (`schema.py`), and on any error the model is left
exactly as it was.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..core import plan, rewrite, untransform
from ..model.state import (
    activate,
    active_adapter,
    adapter_groups,
    adapter_names,
    adapter_state,
    bare,
    check_adapter_name,
    check_name,
    drop,
    is_transformed,
    targets,
)
from .format import (
    LEGACY_CONFIG_FILE,
    V1_NAME,
    check_state,
    read_config_json,
    read_ours,
    rename,
    same_math,
    same_targets,
    saved_active,
    saved_none_active,
    write_adapters,
)
from .format import reread as _reread
from .schema import check_model_type, check_values
from .upstream import is_upstream, read_upstream, resolve_upstream

__all__ = ["load_adapters", "save_adapters"]


def save_adapters(model: nn.Module, path: str | os.PathLike, adapter_name: str | Sequence[str] | None = None,
                  *, overwrite: bool = False) -> Path:
    """Write `amole_config.json` and `adapters.safetensors` into directory `path` (created if needed): the
    adapters named (default: all the model holds), each with its config and targets.

    adapter_name  None: the folder then holds exactly the model's adapters. A name (or names): those are written
                  and the folder's other adapters are kept.
    overwrite     replace an `amole_config.json` / `adapters.safetensors` there that is not ours (or ours that
                  cannot be read, when other adapters would be kept); without it such files are refused.

    The save is one transaction: a reader (also one killed mid-save, docs/training.md) sees the old files or
    the new ones. The directory may be a model directory (`save_pretrained` of a transformed model writes
    both): the names are not PEFT's, so `from_pretrained` of it still loads the base model.
    """
    if not adapter_names(model):
        raise ValueError(f"{type(model).__name__} has no AdaMoLE adapters; call amole_compile.transform first")
    names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
    for name in names or ():
        check_name(model, name)
    state = {k: v.detach() for k, v in adapter_state(model, names).items()}
    return write_adapters(model, path, state, keep_others=names is not None, overwrite=overwrite)


def load_adapters(model: nn.Module, path: str | os.PathLike, *, adapter_name: str | None = None,
                  example_inputs: tuple | dict | torch.Tensor | None = None) -> nn.Module:
    """Load adapters saved by `save_adapters` (or an upstream-repository checkpoint) into `model`.

    adapter_name   None: every adapter in the directory, under its saved name. A name: the directory's adapter
                   of that name, or its only adapter under that name.
    An adapter the model holds already gets the saved values (same targets and math, or an error). Another is
    added: a base model is transformed with its saved config, a transformed one gets it beside its adapters
    (its discovered projections must be the saved ones). A base model then runs the adapter that was active
    when saved (none, if none was); a transformed model keeps its active adapter. A load changes values, not
    which parameters train. Returns the model. On any error the model is exactly as before.
    """
    path = Path(path)
    saved, tensors, was_active, saved_type = _reread(lambda: _read(path, adapter_name))
    fresh, before = not is_transformed(model), active_adapter(model)
    flags = {} if fresh else {id(p): p.requires_grad for p in model.parameters()}  # (a fresh transform freezes)
    added: list[str] = []
    try:
        for name, (config, want, upstream) in saved.items():
            exists = name in adapter_names(model)
            have = targets(model, name) if exists else _plan_bare(model, config, example_inputs)
            if upstream:  # give each upstream module the role discovery found for it
                config, want, resolved = resolve_upstream(have, config, want, tensors)
                tensors = {k.replace(".adapters.", f".adapters.{name}.", 1): v for k, v in resolved.items()}
                have = want if not exists else have
            same_targets(have, want)
            if not exists:
                rewrite(model, have, config, name, example_inputs)
                added.append(name)
            same_targets(targets(model, name), want)
            same_math(adapter_groups(model, name)[0][1].config, config)
        expected = adapter_state(model, list(saved))
        check_state(expected, tensors, str(path))
        _check_materialised(model, expected)
        check_values(expected, tensors, str(path))
        check_model_type(model, saved_type, path)
    except BaseException:
        _undo(model, fresh, added, before, flags)
        raise
    with torch.no_grad():
        for key, p in expected.items():
            p.copy_(tensors[key].to(device=p.device, dtype=p.dtype))
    runs = None if was_active is NONE_ACTIVE else was_active if was_active in saved else next(iter(saved))
    activate(model, runs if fresh else before)
    _restore_flags(model, flags)
    return model


NONE_ACTIVE = object()  # `_read`'s answer for a save of a model that ran no adapter (`"active": null`)


def _check_materialised(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """ValueError when the adapters' parameters are on the meta device: copying into them would drop the values."""
    meta = [k for k, p in expected.items() if p.is_meta]
    if meta:
        raise ValueError(
            f"{type(model).__name__}'s adapter parameters are on the meta device ({meta[0]!r}, {len(meta)} in "
            "all; a model built under init_empty_weights or device='meta'): they hold no storage, so the loaded "
            "values would be dropped. Materialise the model first: model.to_empty(device=...) and load its base "
            "weights (or from_pretrained without init_empty_weights), then call load_adapters")


def _read(path: Path, adapter_name: str | None):
    """-> ({name: (config, targets, upstream?)}, tensors under canonical keys of those names, the adapter that
    was active when saved, the model type saved)."""
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    data, file = read_config_json(path)
    if file.name == LEGACY_CONFIG_FILE and is_upstream(data):
        config, want, tensors = read_upstream(path, data)
        name = adapter_name or V1_NAME
        return {name: (config, want, True)}, tensors, name, None  # keys `<module>.adapters.?.<param>` until
        # resolved
    entries, tensors = read_ours(path, data, file)
    kind = data.get("model_type")
    for name in entries:
        check_adapter_name(name)
    saved = {n: (c, t, False) for n, (c, t) in entries.items()}
    if adapter_name is None:
        return saved, tensors, NONE_ACTIVE if saved_none_active(data) else saved_active(data), kind
    if adapter_name in saved:
        return {adapter_name: saved[adapter_name]}, rename(tensors, adapter_name, adapter_name), adapter_name, kind
    if len(saved) == 1:
        (old, entry), = saved.items()
        return {adapter_name: entry}, rename(tensors, old, adapter_name), adapter_name, kind
    raise ValueError(f"{path} holds adapters {list(saved)}, not {adapter_name!r}: name one of them")


def _plan_bare(model: nn.Module, config, example_inputs) -> list:
    """The targets `config` selects on the model's base (its adapters set aside)."""
    with bare(model):
        return list(plan(model, config, example_inputs=example_inputs).targets)


def _undo(model: nn.Module, fresh: bool, added: list[str], before: str | None, flags: dict) -> None:
    """Take back what a failed load added (and the `requires_grad` flags it changed)."""
    if fresh:
        if is_transformed(model):
            untransform(model)
        return
    for name in added:
        drop(model, name)
    activate(model, before)
    _restore_flags(model, flags)


def _restore_flags(model: nn.Module, flags: dict) -> None:
    """Give the parameters the load found their `requires_grad` back (`flags`: id -> flag; the parameters of an
    adapter it added keep theirs): a load changes values, not what trains."""
    for p in model.parameters():
        flag = flags.get(id(p))
        if flag is not None and p.requires_grad != flag:
            p.requires_grad_(flag)
