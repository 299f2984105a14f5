"""Rewrite pass for nn.Module models: swap each planned projection for an `AdaMoLELinear`, in place.

Pattern:        a `Target` whose module is an nn.Linear or a GPT-2 Conv1D; or one of an nn.MultiheadAttention's
                projections (`<mha>.in_proj_weight`, `<mha>.q/k/v_proj_weight`, `<mha>.out_proj`), which its
                own forward reads as weights.
Replacement:    `parent.<name> = AdaMoLELinear(base_layer=<the original>, roles, columns, config, adapter name)`;
                a fused projection gets one expert set and router per role, each writing its own columns. A
                projection adapted already (an `AdaMoLELinear`) gets the new named adapter added beside the
                ones it holds. An nn.MultiheadAttention is replaced by one `AdaMoLEMultiheadAttention` holding
                it and an adapter holder per planned projection (`model/attention.py`).
Preconditions:  the targets come from `find_attention` on this model (its base); no target holds an adapter of
                this name already.
Invariants:     all or nothing: every replacement is built before any is installed, so an error leaves the
                model as it was; base weights keep their tensors and move to `<module>.base_layer.*`; the
                adapted model's output at initialisation equals the base model's (B = 0).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..config import AdaMoLEConfig
from ..model.attention import IN_PROJ, OUT_PROJ, ROLES, AdaMoLEMultiheadAttention, UnsupportedAttention, weight_of
from ..model.modules import AdapterGroup, linear_features
from ..model.projection import AdaMoLELinear, ProjectionAdapters, Swapped, new_group
from ..model.state import swapped
from .targets import PassReport, Target


class UnsupportedLayerError(TypeError):
    """A planned projection is a layer type the adapters cannot wrap."""


def _parent(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    parent_name, _, child = fqn.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


@dataclasses.dataclass
class Built:
    """What a rewrite installs, built beforehand: new modules by name, new holders in our attention modules,
    new groups on holders adapted already."""

    modules: dict[str, Swapped] = dataclasses.field(default_factory=dict)
    holders: list[tuple[AdaMoLEMultiheadAttention, str, ProjectionAdapters]] = dataclasses.field(default_factory=list)
    groups: list[tuple[ProjectionAdapters, AdapterGroup]] = dataclasses.field(default_factory=list)


def _mha_of(model: nn.Module, fqn: str) -> tuple[str, nn.Module, str] | None:
    """(path, the nn.MultiheadAttention or our module in its place, projection name) when `fqn` names one of
    an nn.MultiheadAttention's projections."""
    path, _, leaf = fqn.rpartition(".")
    if leaf not in IN_PROJ + (OUT_PROJ,):
        return None
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        return None
    return (path, mod, leaf) if isinstance(mod, (nn.MultiheadAttention, AdaMoLEMultiheadAttention)) else None


def _is_parameter(model: nn.Module, fqn: str) -> bool:
    try:
        model.get_parameter(fqn)
    except AttributeError:
        return False
    return True


def _check_features(t: Target, feats: tuple[int, int]) -> None:
    if feats != (t.in_features, t.out_features):
        raise ValueError(f"{t.module}: the plan says {t.in_features} -> {t.out_features} features, the model's "
                         f"layer has {feats[0]} -> {feats[1]}; was the plan made for another model?")


def _attention(model: nn.Module, t: Target, found: tuple, config: AdaMoLEConfig, name: str, built: Built) -> None:
    """Build the adapters of one of an nn.MultiheadAttention's projections (and its module, once)."""
    path, mod, leaf = found
    if not path:
        raise UnsupportedLayerError(f"cannot adapt {t.module}: the model is an nn.MultiheadAttention itself; "
                                    "adapt a module that calls it")
    wrapper = mod if isinstance(mod, AdaMoLEMultiheadAttention) else built.modules.get(path)
    if wrapper is None:
        try:
            wrapper = built.modules[path] = AdaMoLEMultiheadAttention(mod, path)
        except UnsupportedAttention as exc:
            raise UnsupportedLayerError(str(exc)) from None
    weight = weight_of(wrapper.base_layer, leaf)
    feats = (weight.shape[1], weight.shape[0])
    _check_features(t, feats)
    columns = tuple(t.columns(r) for r in t.roles)
    if leaf == "in_proj_weight":
        e = feats[0]
        for role, cols in zip(t.roles, columns, strict=True):
            if role not in ROLES or cols != tuple(range(ROLES.index(role) * e, (ROLES.index(role) + 1) * e)):
                raise ValueError(f"{t.module}: role {role} must own its third of in_proj_weight's rows (torch's "
                                 f"q, k, v layout), the plan gives it {len(cols)} other columns")
    group = new_group(wrapper.base_layer, weight, *feats, t.roles, columns, config)
    holder = wrapper.adapted[leaf] if leaf in wrapper.adapted else None
    if holder is not None:
        if name in holder.adapters:
            raise ValueError(f"{t.module} holds an adapter named {name!r} already; pick another adapter_name, or "
                             "delete_adapter it first")
        built.groups.append((holder, group))
        return
    holder = ProjectionAdapters(*feats).train(wrapper.training)
    holder.add(name, group)
    holder.active = name
    if wrapper is mod:
        built.holders.append((wrapper, leaf, holder))
    else:
        wrapper.adapted[leaf] = holder  # a new module, not installed yet


def build_replacements(model: nn.Module, targets: list[Target], config: AdaMoLEConfig, name: str = "default") -> Built:
    """Build (without installing) the adapter modules (see `Built`); raises before touching the model."""
    built = Built()
    for t in targets:
        found = _mha_of(model, t.module)
        if found is not None:
            _attention(model, t, found, config, name, built)
            continue
        try:
            layer = model.get_submodule(t.module)
        except AttributeError:
            if _is_parameter(model, t.module):
                raise UnsupportedLayerError(f"cannot adapt {t.module}: a bare parameter, not a module; only a "
                                            "module (nn.Linear, Conv1D) can be swapped for an adapter") from None
            raise ValueError(f"the plan targets {t.module}, which {type(model).__name__} does not have") from None
        if isinstance(layer, ProjectionAdapters) and not isinstance(layer, AdaMoLELinear):
            raise ValueError(f"{t.module} is a graph's adapter holder, not a projection")
        base = layer.base_layer if isinstance(layer, AdaMoLELinear) else layer
        feats = linear_features(base)
        if feats is None:
            raise UnsupportedLayerError(
                f"cannot adapt {t.module}: it is a {type(base).__module__}.{type(base).__name__}, and only "
                "nn.Linear (and subclasses) and transformers Conv1D are supported; exclude it with "
                "AdaMoLEConfig(exclude=...)")
        _check_features(t, feats)
        columns = tuple(t.columns(r) for r in t.roles)
        if isinstance(layer, AdaMoLELinear):
            if name in layer.adapters:
                raise ValueError(f"{t.module} holds an adapter named {name!r} already; pick another "
                                 "adapter_name, or delete_adapter it first")
            built.groups.append((layer, layer.new_group(t.roles, columns, config)))
        else:
            built.modules[t.module] = AdaMoLELinear(layer, t.roles, columns, config, name)
    return built


def swap_modules(model: nn.Module, targets: list[Target], config: AdaMoLEConfig,
                 name: str = "default") -> PassReport:
    """Run the pass on `model` in place; returns what it swapped (or added to)."""
    built = build_replacements(model, targets, config, name)
    for fqn, new in built.modules.items():
        parent, child = _parent(model, fqn)
        setattr(parent, child, new)
    for wrapper, leaf, holder in built.holders:
        wrapper.adapted[leaf] = holder
    for holder, group in built.groups:
        holder.add(name, group)
    rewritten = len(built.modules) + len(built.holders) + len(built.groups)
    return PassReport("swap_modules", targets=list(targets), rewritten=rewritten)


def unswap_modules(model: nn.Module) -> int:
    """Undo `swap_modules`: put every swapped module's base layer back. Returns how many were restored."""
    names = [n for n, _ in swapped(model)]
    for fqn in names[::-1]:
        parent, child = _parent(model, fqn)
        setattr(parent, child, getattr(parent, child).base_layer)
    return len(names)
