"""Mixed batches as one projection computes them, and where a call's rows live.

Inside a `batch_adapters` block (`batch.py`) each projection finds its `MixedRows` in a `contextvars.ContextVar`
keyed by the projection: the rows belong to the call, not to the modules, so two threads (or asyncio tasks)
with different rows never see each other's, and nothing is left behind when the block exits. torch.compile
cannot read a ContextVar (dynamo: "does not know how to trace method `get` of class `ContextVar`"), so the
block also mirrors its value into a `threading.local`, which dynamo reads and guards per thread: a compiled
forward sees its own thread's rows (per thread, not per asyncio task, for compiled code).

The math per row is `kernels/mixed_torch.py`'s: one gathered computation whatever the mix.

The rows are the dimension of x that `passes/find_rows.py` found holding them at transform (the projection's
`batch_dim`: 1 in a seq-first model's [S, B, D]); where none was found, a mixed batch raises its reason.

Legend: B rows, S tokens per row, T = B * S, D in_features, O out_features, E experts.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..kernels.mixed_torch import COL_DROPOUT, Stack, mixed_adapter, stack_sites
from .columns import column_gather, combine_deltas
from .modules import ExpertSet, keep_mask, no_autocast
from .tokens import real_tokens


class RoleRows(NamedTuple):
    """One role of a projection in a mixed batch."""

    sites: tuple[ExpertSet, ...]  # the adapters having this role here, in slot order
    lut: Tensor  # [N + 1] long: model-wide adapter index + 1 (0 = none) -> local slot (len(sites) = none)
    cache: dict  # the stacked weights, kept across no-grad eager forwards (generate) while they are unchanged


class BatchDim(NamedTuple):
    """Where a projection's input holds the batch's rows (`passes/find_rows.py` finds it at transform)."""

    dim: int | None  # x's dimension holding the rows (row-major: a flattened [B * S] too), or None: not found
    ndim: int  # x's dimensions when it was found
    why: str  # dim None: why not (a mixed batch raises it)
    name: str = ""  # the projection


UNKNOWN = BatchDim(None, 0, "it was adapted without example inputs to find it by (a forward of them shows where "
                            "its input holds the batch's rows); transform with example_inputs=")


class MixedRows(NamedTuple):
    """A mixed batch as one projection sees it."""

    ids: Tensor  # [B] long: each row's adapter, as an index into the block's adapter names (-1 = none)
    roles: tuple[tuple[str, RoleRows], ...]
    gather: Tensor | None  # the roles' deltas -> the projection's columns (`combine_deltas`)
    n_rest: int  # output columns no role writes


# ---- where a call's rows live -------------------------------------------------------------------------------
_ROWS: contextvars.ContextVar[Mapping[int, MixedRows] | None] = contextvars.ContextVar("amole_rows", default=None)
_TRACE = threading.local()  # `.rows`: _ROWS's value in this thread, for torch.compile (see the module doc)


def current_rows(proj: nn.Module) -> MixedRows | None:
    """The rows `proj` runs in this call (None: outside every block, the active adapter runs)."""
    rows = getattr(_TRACE, "rows", None) if torch.compiler.is_compiling() else _ROWS.get()
    return None if rows is None else rows.get(id(proj))


def open_rows() -> Mapping[int, MixedRows] | None:
    """Every projection's rows in this context (None outside every block)."""
    return _ROWS.get()


@contextlib.contextmanager
def using_rows(rows: Mapping[int, MixedRows]) -> Iterator[None]:
    """Within the block, the projections keyed (by id) in `rows` run them, on top of any outer block's."""
    outer = _ROWS.get()
    token = _ROWS.set({**outer, **rows} if outer else dict(rows))
    _TRACE.rows = _ROWS.get()
    try:
        yield
    finally:
        _ROWS.reset(token)
        _TRACE.rows = _ROWS.get()


# ---- the rows of one projection ---------------------------------------------------------------------------------
def mixed_rows(proj: nn.Module, order: tuple[str, ...], ids: Tensor) -> MixedRows:
    """`proj`'s view of a batch whose rows run adapters `ids` (indices into the adapter names `order`)."""
    roles: dict[str, list[tuple[int, ExpertSet]]] = {}
    columns: dict[str, tuple[int, ...]] = {}
    for index, name in enumerate(order):
        group = proj.adapters[name] if name in proj.adapters else None
        for role, cols in zip(group.roles if group else (), group.columns if group else (), strict=True):
            roles.setdefault(role, []).append((index, group[role]))
            columns[role] = cols
    dtypes = {order[i]: site.lora_A.dtype for entries in roles.values() for i, site in entries}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n!r} {d}" for n, d in dtypes.items())
        raise ValueError(f"adapters of different dtypes cannot share a mixed batch (its rows compute in one "
                         f"dtype): {listed}; give them one adapter_dtype")
    out = []
    for role, entries in roles.items():
        lut = [len(entries)] * (len(order) + 1)
        for local, (index, _) in enumerate(entries):
            lut[index + 1] = local
        out.append((role, RoleRows(tuple(s for _, s in entries), torch.tensor(lut, device=ids.device), {})))
    gather, n_rest = column_gather(tuple(columns[r] for r in roles), proj.out_features, ids.device)
    return MixedRows(ids, tuple(out), gather, n_rest)


# ---- the forward ----------------------------------------------------------------------------------------------
def mixed_add(proj: nn.Module, x: Tensor, y: Tensor, mixed: MixedRows, role: str | None = None) -> Tensor:
    """x [..., D], y [..., O] -> y + each row's adapter delta (`role`: y [..., O_role] holds that role's
    columns only, and gets that role's delta). The rows are x's dimension `proj.batch_dim`."""
    roles = mixed.roles if role is None else tuple(r for r in mixed.roles if r[0] == role)
    if not roles:
        return y
    k = _batch_dim(proj, x)
    if k:  # rows first: x [B', ..., D], y [B', ..., O]
        x, y = x.movedim(k, 0), y.movedim(k, 0)
    ids = _row_ids(mixed.ids, x)
    dtype = roles[0][1].sites[0].lora_A.dtype
    with no_autocast(x.device.type):
        xs = x.reshape(ids.shape[0], -1, proj.in_features).to(dtype)  # [B, S, D]
        deltas = [_role_delta(proj.training, xs, ids, rows) for _, rows in roles]  # each [B, S, O_role]
        full = deltas[0] if role is not None else combine_deltas(deltas, mixed.gather, mixed.n_rest)
        out = y + full.reshape(y.shape).to(y.dtype)
    return out.movedim(0, k) if k else out


def _batch_dim(proj: nn.Module, x: Tensor) -> int:
    """The dimension of x holding the batch's rows; ValueError where it is not known (never a guess)."""
    found = proj.batch_dim or UNKNOWN
    where = f"projection {found.name!r}" if found.name else "a projection"
    if found.dim is None:
        raise ValueError(f"a mixed batch cannot run {where}: it is not known which dimension of its input holds "
                         f"the batch's rows: {found.why}")
    if x.dim() != found.ndim:
        raise ValueError(f"a mixed batch cannot run {where}: its input has {x.dim()} dimensions "
                         f"{tuple(x.shape)}, where the example inputs gave it {found.ndim} with the batch's rows in "
                         f"dimension {found.dim}")
    return found.dim


def _role_delta(training: bool, xs: Tensor, ids: Tensor, rows: RoleRows) -> Tensor:
    slot = rows.lut[ids + 1]  # [B] local slots
    stack = _stack(rows, training)
    drop = None
    if training and any(s.dropout > 0 for s in rows.sites):
        drop = keep_mask(xs, stack.meta[slot, COL_DROPOUT].to(torch.float32)[:, None, None])
    few = xs.shape[1] == 1 and not (torch.compiler.is_compiling() or torch.compiler.is_exporting())
    delta, scores, mask = mixed_adapter(xs, slot, stack, drop, all_slots=few)  # one-token rows: decoding
    _record(training, rows, slot, scores, mask)
    return delta


def _record(training: bool, rows: RoleRows, slot: Tensor, scores: Tensor, mask: Tensor) -> None:
    """Each site's aux loss (training) over its own rows' tokens, and its statistics (counted for all the
    role's sites at once)."""
    b, s, e = mask.shape
    t = b * s
    slot_tok = slot[:, None].expand(b, s).reshape(t)  # [T] each token's slot
    counts = None
    if not training and any(site.counting() for site in rows.sites):
        real = real_tokens((b, s))  # [T] bool, or None: padding goes to the slot no site reads
        counted = slot_tok if real is None else torch.where(real, slot_tok, len(rows.sites))
        counts = _counts(counted, mask.reshape(t, e), len(rows.sites) + 1)
    for j, site in enumerate(rows.sites):
        if counts is not None:
            ej = site.num_experts
            site.record(scores, mask, None, (counts[0][j], counts[1][j, :ej], counts[2][j, :ej + 1]))
            continue
        tokens = slot_tok == j  # [T] this adapter's tokens
        site.record(scores[..., :site.num_experts].reshape(t, -1), mask[..., :site.num_experts].reshape(t, -1),
                    tokens, lead=(b, s))


def _counts(slot_tok: Tensor, mask: Tensor, slots: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per slot: tokens [slots], tokens selecting each expert [slots, E], tokens with 0..E experts [slots, E+1]."""
    with torch.no_grad():
        onehot = torch.nn.functional.one_hot(slot_tok, slots).to(torch.float32).t()  # [slots, T]
        e = mask.shape[1]
        active = torch.nn.functional.one_hot(mask.sum(-1), e + 1).to(torch.float32)  # [T, E+1]
        selected = onehot @ mask.to(torch.float32)  # exact: counts stay far below 2^24
        return onehot.sum(1).long(), selected.long(), (onehot @ active).long()


def _row_ids(ids: Tensor, x: Tensor) -> Tensor:
    """The rows' adapter ids for x [B', ...]: B' = B, or B' = B * n (generate's beams / return sequences, which
    repeat each row n times in place)."""
    b, n = x.shape[0], ids.shape[0]
    if b == n:
        return ids
    if x.dim() < 2 or n == 0 or b % n:
        raise ValueError(f"batch_adapters was given {n} rows' adapters, but a projection sees a batch of {b} "
                         f"rows (input shape {tuple(x.shape)}): pass one adapter name per row of the batch")
    return ids.repeat_interleave(b // n)


def _stack(rows: RoleRows, training: bool) -> Stack:
    """The role's stacked weights; in no-grad eager inference built once and reused until a weight changes."""
    if training or torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return stack_sites([site.weights() for site in rows.sites])
    key = tuple((p.data_ptr(), p._version) for s in rows.sites for p in s.parameters())
    if rows.cache.get("key") != key:
        rows.cache.update(key=key, stack=stack_sites([site.weights() for site in rows.sites]))
    return rows.cache["stack"]

