"""What amole_compile keeps on a transformed model: one `ModelState` record under one attribute, and the
read-only views every layer needs (the adapted projections, the named adapters, their targets and tensors).

    model.__dict__["_amole_state"] = ModelState(active, aux_coef, requires_grad, undo)

Nothing else of ours is written on the user's model. What `transform` installs there (hooks, instance
overrides, third-party flags, the process-wide dynamo flag: the table in `integrations/patches.py`) is pushed
on the record's undo stack, and `untransform` pops it. The record travels with the model: `copy.deepcopy`,
`pickle` and `torch.save(model)` give an independent transformed model, whose hooks, overrides and undo
entries are its own (the copy's memo maps every module the record names to the copy's).

Per-call state (the rows of a `batch_adapters` block) lives with the call, in a `ContextVar` (`mixed.py`);
the record only lists the open blocks, so that deleting an adapter one of them runs can be refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..config import DEFAULT_AUX_LOSS_COEF
from ..passes.targets import Target, compress
from .modules import AdapterGroup
from .projection import ProjectionAdapters, Swapped

ATTR = "_amole_state"  # the model.__dict__ entry holding the record
GRAPH_PREFIX = "_amole"  # a rewritten GraphModule's adapters: `gm._amole.<module>` (passes/insert_ops.py)


@dataclasses.dataclass
class ModelState:
    """amole_compile's record on a transformed model.

    active         the adapter that runs (None: none, the base model)
    aux_coef       the aux-loss coefficient the model adds to its training loss (the active adapter's config's)
    requires_grad  every parameter's requires_grad flag before the transform, restored by untransform
    undo           (patch name, token) for what was installed, in order; untransform pops and removes each
    blocks         open `batch_adapters` blocks on this model (any thread): (description, adapter names);
                   per-process, so a copy or an unpickled model starts with none
    """

    active: str | None = None
    aux_coef: float = DEFAULT_AUX_LOSS_COEF
    requires_grad: dict[str, bool] = dataclasses.field(default_factory=dict)
    undo: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
    blocks: list[tuple[str, frozenset[str]]] = dataclasses.field(default_factory=list)

    def token(self, patch: str) -> Any:
        """The undo token of installed patch `patch` (None when it is not installed)."""
        return next((token for name, token in self.undo if name == patch), None)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["blocks"] = []  # open blocks belong to this process's calls, not to a copy
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def state_of(model: nn.Module) -> ModelState | None:
    """The model's record (None: `transform` was not called on this object)."""
    return model.__dict__.get(ATTR)


def attach_state(model: nn.Module, requires_grad: dict[str, bool]) -> ModelState:
    """A new record on `model` (the object `transform` was given)."""
    if ATTR in model.__dict__:
        raise RuntimeError(f"{type(model).__name__} already holds an amole_compile state record")
    record = ModelState(requires_grad=dict(requires_grad))
    model.__dict__[ATTR] = record
    return record


def detach_state(model: nn.Module) -> ModelState | None:
    """Remove the record from `model` and return it."""
    return model.__dict__.pop(ATTR, None)


# ---- views ------------------------------------------------------------------------------------------------------
def is_transformed(model: nn.Module) -> bool:
    """Does `model` hold AdaMoLE adapters (from `transform` or `load_adapters`)?"""
    return any(isinstance(m, ProjectionAdapters) for m in model.modules())


def swapped(model: nn.Module) -> list[tuple[str, Swapped]]:
    """(module name, our module) for every module of ours standing in for one of the model's, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Swapped)]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def projections(model: nn.Module) -> list[tuple[str, ProjectionAdapters]]:
    """(canonical name, its adapters) for every adapted projection, in model order: a swapped projection's name
    in the base model (an nn.MultiheadAttention's `in_proj_weight`, ...), a graph's unprefixed."""
    out, inside = [], set()
    for name, mod in model.named_modules():
        if isinstance(mod, Swapped):
            for sub, holder in mod.holders().items():
                out.append((_join(name, sub), holder))
                inside.add(id(holder))
        elif isinstance(mod, ProjectionAdapters) and id(mod) not in inside:
            out.append((name[len(GRAPH_PREFIX) + 1:] if name.startswith(GRAPH_PREFIX + ".") else name, mod))
    return out


def key_prefixes(model: nn.Module) -> list[tuple[str, str, bool]]:
    """(state-dict key prefix in the transformed model, the same keys' canonical prefix, adapters?) for every
    module of ours, longest first: a swapped module's base layer keys go back to the base model's names
    (`q_proj.base_layer.` -> `q_proj.`), its adapters' to their projection's canonical name
    (`self_attn.adapted.in_proj_weight.adapters.` -> `self_attn.in_proj_weight.adapters.`)."""
    out = []
    for name, mod in swapped(model):
        p = f"{name}." if name else ""
        out.append((f"{p}base_layer.", p, False))
        for sub in mod.holders():
            real = mod.holder_path(sub)
            out.append((p + (f"{real}." if real else "") + "adapters.", p + (f"{sub}." if sub else "") + "adapters.",
                        True))
    return sorted(out, key=lambda t: -len(t[0]))


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters `model` holds, in the order they were added."""
    names: dict[str, None] = {}
    for _, proj in projections(model):
        names.update(dict.fromkeys(proj.adapters))
    return list(names)


def active_adapter(model: nn.Module) -> str | None:
    """The name of the adapter the model computes with (None: none, the base model runs)."""
    record = state_of(model)
    if record is not None:
        return record.active
    names = adapter_names(model)
    return names[0] if names else None


def check_name(model: nn.Module, name: str) -> str:
    """`name` if the model holds that adapter, else ValueError naming the known ones."""
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"unknown adapter {name!r}; {type(model).__name__} holds {names or 'no adapters'}")
    return name


def check_adapter_name(name: str) -> str:
    """`name` if it can name an adapter (a non-empty string without dots that is no nn.Module attribute, since
    it names a submodule), else ValueError."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {name!r}")
    if hasattr(nn.ModuleDict, name):
        raise ValueError(f"adapter_name {name!r} is the name of an nn.Module attribute; pick another name")
    return name


def adapter_groups(model: nn.Module, name: str | None = None) -> list[tuple[str, AdapterGroup]]:
    """(module name, group) for every projection adapter `name` (default: the active one) adapts."""
    name = active_adapter(model) if name is None else name
    return [(m, proj.adapters[name]) for m, proj in projections(model) if name in proj.adapters]


def targets(model: nn.Module, name: str | None = None) -> list[Target]:
    """The projections adapter `name` (default: the active one) adapts, as `Target(module, roles, slices, in,
    out)`."""
    return [Target(m, g.roles, tuple(compress(c) for c in g.columns), g.in_features, g.out_features)
            for m, g in adapter_groups(model, name)]


def adapter_state(model: nn.Module, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Canonical adapter parameters `<module>.adapters.<name>.<role>.<param>` -> tensor (the same names on the
    module and graph paths) of the adapters `names` (default: all)."""
    state = {}
    for name in adapter_names(model) if names is None else names:
        for module, group in adapter_groups(model, name):
            for pname, p in group.named_parameters():
                state[f"{module}.adapters.{name}.{pname}"] = p
    return state


# ---- changes --------------------------------------------------------------------------------------------------
def activate(model: nn.Module, name: str | None, freeze_base: bool = False) -> None:
    """Adapter `name` runs on every projection it adapts (None: none runs) and is the only adapter whose
    parameters train; the model's own parameters keep their flags (a head the user trains stays trainable), or,
    with `freeze_base` (transform), all freeze. The record's aux-loss coefficient becomes its config's."""
    adapters: set[int] = set()
    for _, proj in projections(model):
        proj.active = name if name is not None and name in proj.adapters else None
        adapters.update(id(p) for group in proj.adapters.values() for p in group.parameters())
    groups = adapter_groups(model, name) if name is not None else []
    trainable = {id(p) for _, g in groups for p in g.parameters()}
    for p in model.parameters():
        if freeze_base or id(p) in adapters:
            p.requires_grad_(id(p) in trainable)
    record = state_of(model)
    if record is not None:
        record.active = name
        if groups:
            record.aux_coef = float(groups[0][1].config.aux_loss_coef)


def drop(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every projection (base layers back where none is left)."""
    for _, proj in projections(model):
        if name in proj.adapters:
            proj.remove(name)
    for fqn, mod in swapped(model)[::-1]:
        if mod.prune():
            model.set_submodule(fqn, mod.base_layer)


@contextlib.contextmanager
def bare(model: nn.Module) -> Iterator[nn.Module]:
    """The model with its base layers back in place of the adapted ones (for planning another adapter)."""
    holders = swapped(model)
    for name, holder in holders:
        model.set_submodule(name, holder.base_layer)
    try:
        yield model
    finally:
        for name, holder in holders:
            model.set_submodule(name, holder)
