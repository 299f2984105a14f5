"""The adapters of one projection: `ProjectionAdapters` (every named adapter on it, which one runs, and mixed
batches) and `AdaMoLELinear` (that, plus the frozen projection as `.base_layer`, replacing it in the model).

Parameter paths are `<projection>.adapters.<adapter name>.<role>.<param>` (the canonical key names of the
adapter files). One adapter is active at a time (`set_active_adapter`); inside `batch_adapters` each row of
the batch runs its own adapter (`mixed.py`).

Legend: B rows, S tokens per row, T = B * S, D in_features, O out_features.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import AdaMoLEConfig
from ..kernels import traced
from .folding import HELD, Held, add_linears
from .mixed import BatchDim, current_rows, mixed_add
from .modules import AdapterGroup, autocast_on, linear_features


def new_group(layer: nn.Module, weight: Tensor, in_features: int, out_features: int, roles: tuple[str, ...],
              columns: tuple[tuple[int, ...], ...], config: AdaMoLEConfig) -> AdapterGroup:
    """An adapter for the projection by `weight` (of `layer`): in `config.adapter_dtype`, else the weight's
    dtype (a quantized weight's compute dtype), on its device."""
    dtype = getattr(torch, config.adapter_dtype) if config.adapter_dtype else weight.dtype
    if not dtype.is_floating_point:  # a quantized layer (bitsandbytes): its compute dtype
        dtype = getattr(layer, "compute_dtype", None) or torch.float32
    return AdapterGroup(in_features, out_features, roles, columns, config, dtype, weight.device)


class ProjectionAdapters(nn.Module):
    """Every named adapter (`AdapterGroup`) on one projection; `active` names the one that runs (or None)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.batch_dim = None  # where x holds the batch's rows (passes/find_rows.py)

    @property
    def batch_dim(self) -> BatchDim | None:
        """Which dimension of this projection's input holds the batch's rows (None: not looked for yet)."""
        return self.__dict__.get("_batch_dim")

    @batch_dim.setter
    def batch_dim(self, found: BatchDim | None) -> None:
        """Set it, and each adapter's `rows_dim` with it."""
        self.__dict__["_batch_dim"] = found
        rows = self._rows_dim()
        for group in self.adapters.values():
            group.rows_dim = rows

    def _rows_dim(self) -> int:
        """The adapters' `rows_dim`: the statistics' (B, S) or (S, B) reading of a 3-D input (0 where not found,
        as before; -1 for any other layout: every token counts)."""
        found = self.batch_dim
        if found is None or found.dim is None:
            return 0
        return found.dim if found.ndim == 3 and found.dim in (0, 1) else -1

    @property
    def group(self) -> AdapterGroup | None:
        """The active adapter's group (None when no adapter runs here). Read from the module dicts: it is asked per
        call (`AdaMoLELinear.folding_group`), and `nn.Module.__getattr__` costs ~0.5 us a name."""
        active = self.active
        return None if active is None else self._modules["adapters"]._modules[active]

    def add(self, name: str, group: AdapterGroup) -> None:
        """Add adapter `name` (not active until `active` names it)."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} exists already")
        self.adapters[name] = group.train(self.training)
        group.rows_dim = self._rows_dim()

    def remove(self, name: str) -> None:
        """Drop adapter `name` (and stop running it if it was active)."""
        del self.adapters[name]
        if self.active == name:
            self.active = None

    def add_to(self, x: Tensor, y: Tensor) -> Tensor:
        """x [..., D], y [..., O] (the projection's output) -> y + the active adapter's delta (or each row's)."""
        rows = current_rows(self)  # this call's rows inside a batch_adapters block (mixed.py)
        if rows is not None:
            return mixed_add(self, x, y, rows)
        group = self.group
        return y if group is None else group.add_to(x, y)

    def add_role(self, role: str, x: Tensor, y: Tensor) -> Tensor:
        """x [..., D], y [..., O_role] (the projection's output columns of `role`, in order) -> y + the active
        adapter's delta for `role` (or each row's): for a fused projection whose roles read different inputs
        (nn.MultiheadAttention's cross-attention)."""
        rows = current_rows(self)
        if rows is not None:
            return mixed_add(self, x, y, rows, role)
        group = self.group
        return y if group is None or role not in group.roles else group.add_role(role, x, y)


class Swapped(nn.Module):
    """A module of ours in the place of one of the model's, which it keeps unchanged as `.base_layer`.

    `holders()` maps the name of each projection it adapts, relative to it ("" for itself), to its adapters;
    `holder_path(name)` is where those live, relative to it. Both names agree for `AdaMoLELinear`; they differ
    for `attention.AdaMoLEMultiheadAttention` (`in_proj_weight` lives in `adapted.in_proj_weight`), whose
    `OWN` prefixes say which of its keys are its own rather than its base layer's.
    """

    OWN: tuple[str, ...] = ("base_layer.", "adapters.")

    def holders(self) -> dict[str, ProjectionAdapters]:
        """The projections it adapts: name relative to it ("" for itself) -> their adapters."""
        raise NotImplementedError

    def holder_path(self, name: str) -> str:
        """Where holder `name` lives, relative to it."""
        return name

    def prune(self) -> bool:
        """Drop holders left with no adapter; -> is no adapter left here (the base layer goes back)?"""
        return not any(h.adapters for h in self.holders().values())


class AdaMoLELinear(ProjectionAdapters, Swapped):
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
        return new_group(self.base_layer, self.base_layer.weight, self.in_features, self.out_features, roles, columns,
                         config)

    def holders(self) -> dict[str, ProjectionAdapters]:
        """Itself: the one projection it adapts."""
        return {"": self}

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
        """x [..., D] -> base_layer(x) + the adapters' deltas [..., O]; computed by one folded op where
        `folding_group` finds the adapter can take the projection in, together with its siblings (`siblings`) where
        they can be folded too: their results are held for their own calls on the same x (`Held`)."""
        group = self.folding_group(x)
        if group is None:
            return self.add_to(x, self.base_layer(x))
        held = HELD.get()
        if held is not None and held.x is x:
            y = held.take(self, x, group)
            if y is not None:
                return y
        siblings = self.__dict__.get("_siblings")
        if siblings is not None and not x.is_inference():
            y = self._fold_siblings(x, group, siblings)
            if y is not None:
                return y
        params = self._modules["base_layer"]._parameters
        return group.add_linear(x, params["weight"], params["bias"])

    def _fold_siblings(self, x: Tensor, group: AdapterGroup, siblings: tuple) -> Tensor | None:
        """This projection and every sibling that can fold on x (`folding_group`: an active adapter, no hooks...)
        in one op: this one's output is returned and recorded, the others' held (`Held`) until their calls; a
        sibling that cannot fold runs alone when called. None where no other sibling can fold."""
        folds, members = [], []
        for holder in siblings:
            g = group if holder is self else holder.folding_group(x)
            if g is not None:
                params = holder._modules["base_layer"]._parameters
                folds.append((g, params["weight"], params["bias"]))
                members.append(holder)
        if len(folds) < 2:
            return None
        results = add_linears(x, folds)
        held, mine = Held(x, x._version, torch.is_grad_enabled(), {}), None
        for holder, (g, _, _), (y, outs) in zip(members, folds, results, strict=True):
            if holder is self:
                g.record_outs(x, outs)
                mine = y
            else:
                held.results[id(holder)] = (holder, g, g.training, y, outs)
        HELD.set(held)
        return mine

    def folding_group(self, x: Tensor) -> AdapterGroup | None:
        """The active adapter, where one op can compute the frozen projection too (`AdapterGroup.add_linear`: x's
        gradients summed in one addmm, no second node, a fused projection's deltas added into its output in
        place), or None where the projection must run as itself: a traced call, a mixed batch, roles not owning
        contiguous column blocks in order (an interleaved fused layout), x not in the adapter's dtype or on the
        weight's device, autocast, a base layer that is anything but a plain nn.Linear with frozen weights and
        no hooks, a site with hooks or a forward of its own, or an `add_to` shadowed on the instance (the check
        pass's marker: the call must reach it). Asked per call, so it reads modules' dicts directly
        (`nn.Module.__getattr__` costs ~0.5 us a name)."""
        if traced(x) or current_rows(self) is not None or "add_to" in self.__dict__:
            return None
        group, base = self.group, self._modules["base_layer"]
        if group is None or not group.columns_in_order() or not plain_frozen_linear(base):
            return None
        w, device = base._parameters["weight"], x.device
        if x.dtype != w.dtype or device != w.device:
            return None
        for site in group._modules.values():  # (global hooks: checked with the base layer's)
            if site._parameters["lora_A"].dtype != w.dtype or _own_hooks(site) or "forward" in site.__dict__:
                return None
        return None if autocast_on(device.type) else group


def plain_frozen_linear(layer: nn.Module) -> bool:
    """Is `layer` exactly an nn.Linear, its weight and bias plain parameters that need no gradient, with no hook
    of its own or global one, no instance-level forward (accelerate's hooks replace `forward`) or weight, and
    nn.Linear.forward and F.linear themselves not patched (as some libraries do, process-wide: the fold computes
    the projection's gradient itself)? Then F.linear(x, weight, bias) is all its call would do."""
    if (type(layer) is not nn.Linear or nn.Linear.forward is not _LINEAR_FORWARD
            or torch.nn.functional.linear is not _F_LINEAR or _has_hooks(layer)
            or not _INSTANCE_NAMES.isdisjoint(layer.__dict__)):
        return False
    params = layer._parameters
    w, b = params.get("weight"), params.get("bias")
    return (type(w) is nn.Parameter and not w.requires_grad
            and (b is None or (type(b) is nn.Parameter and not b.requires_grad)))


_INSTANCE_NAMES = frozenset(("forward", "weight", "bias"))  # on the instance, these shadow nn.Linear's own
_LINEAR_FORWARD, _F_LINEAR = nn.Linear.forward, torch.nn.functional.linear  # torch's own; a patched one must run


def _has_hooks(layer: nn.Module) -> bool:
    """Does a call of `layer` run any hook: its own, or a global one?"""
    return _own_hooks(layer) or _global_hooks()


def _own_hooks(layer: nn.Module) -> bool:
    return bool(layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks
                or layer._backward_pre_hooks)


def _global_hooks() -> bool:
    """Is a global module hook registered? torch's registries of them are private names (read only): one a later
    torch drops reads as hooked, so the fold never skips a hook it cannot see."""
    g = torch.nn.modules.module
    try:
        return bool(g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                    or g._global_backward_pre_hooks)
    except AttributeError:
        return True
