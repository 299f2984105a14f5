"""The adapters of one projection: `ProjectionAdapters` (every named adapter on it, which one runs, and mixed
batches) and `AdaMoLELinear` (that, plus the frozen projection as `.base_layer`, replacing it in the model).

Parameter paths are `<projection>.adapters.<adapter name>.<role>.<param>` (the canonical key names of the
adapter files). One adapter is active at a time (`set_active_adapter`); inside `batch_adapters` each row of
the batch runs its own adapter (`kernels/mixed_torch.py`).

Legend: B rows, S tokens per row, T = B * S, D in_features, O out_features.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .config import AdaMoLEConfig
from .kernels.mixed_torch import COL_DROPOUT, SiteWeights, Stack, mixed_adapter, stack_sites
from .modules import AdapterGroup, ExpertSet, column_gather, combine_deltas, keep_mask, linear_features


class RoleRows(NamedTuple):
    """One role of a projection in a mixed batch."""

    sites: tuple[ExpertSet, ...]  # the adapters having this role here, in slot order
    lut: Tensor  # [N + 1] long: model-wide adapter index + 1 (0 = none) -> local slot (len(sites) = none)
    cache: dict  # the stacked weights, kept across no-grad eager forwards (generate) while they are unchanged


class MixedRows(NamedTuple):
    """A mixed batch as one projection sees it."""

    ids: Tensor  # [B] long: each row's adapter, as an index into the model's adapter names (-1 = none)
    roles: tuple[tuple[str, RoleRows], ...]
    gather: Tensor | None  # the roles' deltas -> the projection's columns (`combine_deltas`)
    n_rest: int  # output columns no role writes


class ProjectionAdapters(nn.Module):
    """Every named adapter (`AdapterGroup`) on one projection; `active` names the one that runs (or None)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.mixed: MixedRows | None = None  # set by batch_adapters

    @property
    def group(self) -> AdapterGroup | None:
        """The active adapter's group (None when no adapter runs here)."""
        return None if self.active is None else self.adapters[self.active]

    def add(self, name: str, group: AdapterGroup) -> None:
        """Add adapter `name` (not active until `active` names it)."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} exists already")
        self.adapters[name] = group.train(self.training)

    def remove(self, name: str) -> None:
        """Drop adapter `name` (and stop running it if it was active)."""
        del self.adapters[name]
        if self.active == name:
            self.active = None

    def add_to(self, x: Tensor, y: Tensor) -> Tensor:
        """x [..., D], y [..., O] (the projection's output) -> y + the active adapter's delta (or each row's)."""
        if self.mixed is not None:
            return self._mixed_add(x, y, self.mixed)
        group = self.group
        return y if group is None else group.add_to(x, y)

    def _mixed_add(self, x: Tensor, y: Tensor, mixed: MixedRows) -> Tensor:
        ids = _row_ids(mixed.ids, x)
        if not mixed.roles:
            return y
        dtype = mixed.roles[0][1].sites[0].lora_A.dtype
        with torch.autocast(x.device.type, enabled=False):
            xs = x.reshape(ids.shape[0], -1, self.in_features).to(dtype)  # [B, S, D]
            deltas = [self._role_delta(xs, ids, rows) for _, rows in mixed.roles]  # each [B, S, O_role]
            full = combine_deltas(deltas, mixed.gather, mixed.n_rest)
            return y + full.reshape(y.shape).to(y.dtype)

    def _role_delta(self, xs: Tensor, ids: Tensor, rows: RoleRows) -> Tensor:
        slot = rows.lut[ids + 1]  # [B] local slots
        stack = _stack(rows, self.training)
        drop = None
        if self.training and any(s.dropout > 0 for s in rows.sites):
            drop = keep_mask(xs, stack.meta[slot, COL_DROPOUT].to(torch.float32)[:, None, None])
        few = xs.shape[1] == 1 and not (torch.compiler.is_compiling() or torch.compiler.is_exporting())
        delta, scores, mask = mixed_adapter(xs, slot, stack, drop, all_slots=few)  # one-token rows: decoding
        self._record(rows, slot, scores, mask)
        return delta

    def _record(self, rows: RoleRows, slot: Tensor, scores: Tensor, mask: Tensor) -> None:
        """Each site's aux loss (training) over its own rows' tokens, and its statistics (counted for all the
        role's sites at once)."""
        b, s, e = mask.shape
        t = b * s
        slot_tok = slot[:, None].expand(b, s).reshape(t)  # [T] each token's slot
        counts = None
        if not self.training and any(site.track_stats for site in rows.sites):
            counts = _counts(slot_tok, mask.reshape(t, e), len(rows.sites) + 1)
        for j, site in enumerate(rows.sites):
            if counts is not None:
                ej = site.num_experts
                site.record(scores, mask, None, (counts[0][j], counts[1][j, :ej], counts[2][j, :ej + 1]))
                continue
            tokens = slot_tok == j  # [T] this adapter's tokens
            site.record(scores[..., :site.num_experts].reshape(t, -1), mask[..., :site.num_experts].reshape(t, -1),
                        tokens)


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
        return stack_sites([_weights(s) for s in rows.sites])
    key = tuple((p.data_ptr(), p._version) for s in rows.sites for p in s.parameters())
    if rows.cache.get("key") != key:
        rows.cache.update(key=key, stack=stack_sites([_weights(s) for s in rows.sites]))
    return rows.cache["stack"]


def _weights(site: ExpertSet) -> SiteWeights:
    return SiteWeights(site.lora_A, site.lora_B, site.gate, site.threshold_weight, site.threshold_bias,
                       site.method, site.num_experts, site.top_k, site.scale, site.max_threshold,
                       site.dropout if site.training else 0.0)


def mixed_rows(proj: ProjectionAdapters, order: tuple[str, ...], ids: Tensor) -> MixedRows:
    """`proj`'s view of a batch whose rows run adapters `ids` (indices into the model's names `order`)."""
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


class AdaMoLELinear(ProjectionAdapters):
    """A projection with AdaMoLE adapters; the frozen original is kept as `.base_layer`."""

    def __init__(self, base_layer: nn.Module, roles: tuple[str, ...], columns: tuple[tuple[int, ...], ...],
                 config: AdaMoLEConfig, name: str = "default") -> None:
        feats = linear_features(base_layer)
        if feats is None:
            raise TypeError(f"cannot adapt a {type(base_layer).__name__}: only nn.Linear and Conv1D are supported")
        super().__init__(*feats)
        self.base_layer = base_layer
        self.train(base_layer.training)  # the adapters follow the mode of the layer they join
        self.add(name, self.new_group(roles, columns, config))
        self.active = name

    def new_group(self, roles: tuple[str, ...], columns: tuple[tuple[int, ...], ...],
                  config: AdaMoLEConfig) -> AdapterGroup:
        """An adapter for this projection (not added): in `config.adapter_dtype`, else the weight's dtype (a
        quantized weight's compute dtype)."""
        weight = self.base_layer.weight
        dtype = getattr(torch, config.adapter_dtype) if config.adapter_dtype else weight.dtype
        if not dtype.is_floating_point:  # a quantized layer (bitsandbytes): its compute dtype
            dtype = getattr(self.base_layer, "compute_dtype", None) or torch.float32
        return AdapterGroup(self.in_features, self.out_features, roles, columns, config, dtype, weight.device)

    @property
    def weight(self) -> Tensor:
        """The frozen projection's weight."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        """The frozen projection's bias (None if it has none)."""
        return self.base_layer.bias

    @property
    def roles(self) -> tuple[str, ...]:
        """The active adapter's roles here (() when none is active)."""
        return () if self.group is None else self.group.roles

    def extra_repr(self) -> str:
        """The active adapter, for `repr`."""
        return f"active={self.active!r}"

    def forward(self, x: Tensor) -> Tensor:
        """x [..., D] -> base_layer(x) + the adapters' deltas [..., O]."""
        return self.add_to(x, self.base_layer(x))
