"""Blocks in which each row of a batch runs its own adapter: the mechanism under `batch_adapters` and the ONNX
export's `adapter_ids` input.

A block builds every projection's `MixedRows` once, puts them in the call's context (`mixed.using_rows`: a
ContextVar, so thread- and task-local) and lists itself on the model's record while it is open, so that
deleting an adapter it runs is refused (from any thread) instead of leaving rows on a deleted adapter.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import fx, nn

from .mixed import mixed_rows, using_rows
from .state import adapter_names, check_name, projections, state_of


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
def mixed_batch(model: nn.Module, ids: torch.Tensor, order: Sequence[str] | None = None,
                what: str = "mixed batch") -> Iterator[None]:
    """Row i runs adapter `order[ids[i]]` (-1: none; `order` defaults to `adapter_names(model)`, and only its
    adapters are stacked); `ids` [B] long may be a traced tensor (the ONNX export's `adapter_ids` input), so
    it is not checked here. `what` names the block in the error a deletion of one of its adapters gets."""
    if isinstance(model, fx.GraphModule):
        raise ValueError("mixed batches need an nn.Module model: a GraphModule's single adapter is in its graph")
    order = tuple(adapter_names(model) if order is None else (check_name(model, n) for n in order))
    if not order:
        raise ValueError(f"{type(model).__name__} holds no adapters; transform it first")
    rows = {id(proj): mixed_rows(proj, order, ids) for _, proj in projections(model)}
    record = state_of(model)
    entry = (f"{what} in thread {threading.current_thread().name!r}", frozenset(order))
    if record is not None:
        record.blocks.append(entry)
    try:
        with using_rows(rows):
            yield
    finally:
        if record is not None:
            record.blocks.remove(entry)


def check_unused(model: nn.Module, name: str) -> None:
    """ValueError naming the open block that runs adapter `name` (its rows would run a deleted adapter)."""
    record = state_of(model)
    for what, names in list(record.blocks) if record is not None else ():
        if name in names:
            raise ValueError(f"adapter {name!r} is in use by an open {what}; delete it after the block exits")
