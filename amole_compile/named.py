"""Named adapters: several adapters on one model, which one runs, and mixed batches.

    transform(model, cfg_a, adapter_name="a"); transform(model, cfg_b, adapter_name="b")   # two adapters
    set_active_adapter(model, "a")                                   # "a" runs (and is the one that trains)
    with batch_adapters(model, ["a", "b", None, "a"]):               # row i runs adapter names[i] (None: base)
        model.generate(input_ids, attention_mask=mask)
    delete_adapter(model, "b")

In a mixed batch each row gathers its adapter's weights (`kernels/mixed_torch.py`): one batched computation
whatever the mix, no copy of the batch per adapter, and no shape that depends on the mix, so `torch.compile`
does not recompile when the mix changes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from torch import fx, nn

from .adapted import active_adapter, adapter_names, check_name, projections
from .core import activate, untransform
from .projection import AdaMoLELinear, mixed_rows

__all__ = ["active_adapter", "adapter_names", "batch_adapters", "delete_adapter", "set_active_adapter"]

log = logging.getLogger("amole_compile")


def set_active_adapter(model: nn.Module, name: str | None) -> nn.Module:
    """Run adapter `name` (None: no adapter, the base model). Only the active adapter's parameters train, and
    the model adds its config's `aux_loss_coef` times the aux loss to its loss. Returns the model."""
    if name is not None:
        check_name(model, name)
    if isinstance(model, fx.GraphModule) and name is None:
        raise ValueError("a GraphModule's adapter is part of its graph and cannot be switched off; untransform it")
    activate(model, name)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter `name`. Projections left with no adapter get their base layer back; removing the last
    adapter untransforms the model. If `name` was active, the first remaining adapter becomes active (logged).
    Returns the model."""
    check_name(model, name)
    if adapter_names(model) == [name]:
        return untransform(model)
    was_active = active_adapter(model) == name
    drop(model, name)
    if was_active:
        new = adapter_names(model)[0]
        log.warning("deleted the active adapter %r; %r is active now", name, new)
        activate(model, new)
    return model


def drop(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every projection (base layers back where none is left)."""
    for fqn, proj in projections(model):
        if name not in proj.adapters:
            continue
        proj.remove(name)
        if not proj.adapters and isinstance(proj, AdaMoLELinear):
            model.set_submodule(fqn, proj.base_layer)


@contextlib.contextmanager
def batch_adapters(model: nn.Module, rows: Sequence[str | int | None]) -> Iterator[nn.Module]:
    """Within the block, row i of every batch runs adapter `rows[i]`: a name, an index into `adapter_names`, or
    None / -1 for the base model. The batch must have len(rows) rows (or a multiple: `generate` repeats each
    row for beams and return sequences). Rows of one adapter equal that adapter run alone on them."""
    if isinstance(rows, (str, torch.Tensor)) or not isinstance(rows, Sequence):
        raise TypeError(f"batch_adapters takes a list of adapter names (or None) per row, got {type(rows).__name__}")
    ids = row_ids(model, rows)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with mixed_batch(model, torch.tensor(ids, dtype=torch.long, device=device)):
        yield model


def row_ids(model: nn.Module, rows: Sequence[str | int | None]) -> list[int]:
    """Per-row adapter indices into `adapter_names(model)` (-1: none); ValueError naming an unknown one."""
    names = adapter_names(model)
    out = []
    for row in rows:
        if row is None:
            out.append(-1)
        elif isinstance(row, str):
            out.append(names.index(check_name(model, row)))
        elif isinstance(row, int) and not isinstance(row, bool) and -1 <= row < len(names):
            out.append(row)
        else:
            raise ValueError(f"adapter id {row!r} is out of range: {type(model).__name__} holds {len(names)} "
                             f"adapters {names} (ids 0..{len(names) - 1}, or -1 / None for the base model)")
    return out


@contextlib.contextmanager
def mixed_batch(model: nn.Module, ids: torch.Tensor, order: Sequence[str] | None = None) -> Iterator[None]:
    """Row i runs adapter `order[ids[i]]` (-1: none; `order` defaults to `adapter_names(model)`, and only its
    adapters are stacked); `ids` [B] long may be a traced tensor (the ONNX export's `adapter_ids` input), so
    it is not checked here."""
    if isinstance(model, fx.GraphModule):
        raise ValueError("mixed batches need an nn.Module model: a GraphModule's single adapter is in its graph")
    order = tuple(adapter_names(model) if order is None else (check_name(model, n) for n in order))
    if not order:
        raise ValueError(f"{type(model).__name__} holds no adapters; transform it first")
    projs = [proj for _, proj in projections(model)]
    saved = [proj.mixed for proj in projs]
    for proj in projs:
        proj.mixed = mixed_rows(proj, order, ids)
    try:
        yield
    finally:
        for proj, old in zip(projs, saved, strict=True):
            proj.mixed = old
