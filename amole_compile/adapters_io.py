"""Adapters on disk: `save_adapters` / `load_adapters`.

Our format is a directory with `amole_config.json` ({"format": "amole_compile", "config": ..., "targets": ...})
and `adapters.safetensors` (keys `<module>.adapters.<role>.<param>`), each written atomically (temp file, then
rename). The names do not collide with PEFT's (`adapter_config.json`, `adapter_model.safetensors`), so a model
directory written by `save_pretrained` can hold both the base model and our adapters; `from_pretrained` of it
gives the base model. Directories written before the rename (`adapter_config.json` with
`"format": "amole_compile"`) are still read. `load_adapters` also reads the upstream repository's format
(`peft_type` ADAMOLE / MOLE / LORA with `adapter_model.bin` or `.safetensors`; see `_upstream_format.py` and
docs/upstream_format.md). Keys and shapes are checked strictly, and nothing is changed unless everything checks out.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .adapter_files import (
    LEGACY_CONFIG_FILE,
    adapter_state,
    check_state,
    read_config_json,
    read_ours,
    same_math,
    same_targets,
    write_adapters,
)
from .core import adapter_groups, is_transformed, plan, rewrite, targets, untransform

__all__ = ["adapter_state", "load_adapters", "save_adapters"]


def save_adapters(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write `amole_config.json` and `adapters.safetensors` into directory `path` (created if needed).

    The directory may be a model directory (`save_pretrained` of a transformed model writes both): the names
    are not PEFT's, so `from_pretrained` of it still loads the base model.
    """
    if not adapter_groups(model):
        raise ValueError(f"{type(model).__name__} has no AdaMoLE adapters; call amole_compile.transform first")
    return write_adapters(model, path, {k: v.detach() for k, v in adapter_state(model).items()})


def load_adapters(model: nn.Module, path: str | os.PathLike, *,
                  example_inputs: tuple | dict | torch.Tensor | None = None) -> nn.Module:
    """Load adapters saved by `save_adapters` (or an upstream-repository checkpoint) into `model`.

    A base model is transformed first with the saved config (its discovered projections must be the saved
    ones). Returns the model. On any error the model is exactly as before.
    """
    from ._upstream_format import is_upstream, read_upstream, resolve_upstream

    path = Path(path)
    data, file = read_config_json(path)
    upstream = file.name == LEGACY_CONFIG_FILE and is_upstream(data)
    config, want, tensors = read_upstream(path, data) if upstream else read_ours(path, data, file)
    fresh = not is_transformed(model)
    have = list(plan(model, config, example_inputs=example_inputs).targets) if fresh else targets(model)
    if upstream:
        config, want, tensors = resolve_upstream(have, config, want, tensors)
        if fresh:
            have = want
    if fresh:
        same_targets(have, want)
        rewrite(model, have, config)
    try:
        same_targets(targets(model), want)
        same_math(adapter_groups(model)[0][1].config, config)
        expected = adapter_state(model)
        check_state(expected, tensors, str(path))
        with torch.no_grad():
            for key, p in expected.items():
                p.copy_(tensors[key].to(device=p.device, dtype=p.dtype))
    except BaseException:
        if fresh:
            untransform(model)
        raise
    return model
