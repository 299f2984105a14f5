"""Rewrite pass for nn.Module models: swap each planned projection for an `AdaMoLELinear`, in place.

Pattern:        a `Target` whose module is an nn.Linear or a GPT-2 Conv1D.
Replacement:    `parent.<name> = AdaMoLELinear(base_layer=<the original>, roles, columns, config, adapter name)`;
                a fused projection gets one expert set and router per role, each writing its own columns. A
                projection adapted already (an `AdaMoLELinear`) gets the new named adapter added beside the
                ones it holds.
Preconditions:  the targets come from `find_attention` on this model (its base); no target holds an adapter of
                this name already.
Invariants:     all or nothing: every replacement is built before any is installed, so an error leaves the
                model as it was; base weights keep their tensors and move to `<module>.base_layer.*`; the
                adapted model's output at initialisation equals the base model's (B = 0).
"""

from __future__ import annotations

from torch import nn

from ..config import AdaMoLEConfig
from ..model.modules import AdapterGroup, linear_features
from ..model.projection import AdaMoLELinear, ProjectionAdapters
from .targets import PassReport, Target


class UnsupportedLayerError(TypeError):
    """A planned projection is a layer type the adapters cannot wrap."""


def _parent(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    parent_name, _, child = fqn.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def build_replacements(model: nn.Module, targets: list[Target], config: AdaMoLEConfig, name: str = "default"
                       ) -> tuple[dict[str, AdaMoLELinear], dict[str, AdapterGroup]]:
    """Build (without installing) the adapter modules: (new `AdaMoLELinear` per plain projection, new group
    per projection adapted already); raises before touching the model."""
    built, added = {}, {}
    for t in targets:
        try:
            layer = model.get_submodule(t.module)
        except AttributeError:
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
        if feats != (t.in_features, t.out_features):
            raise ValueError(f"{t.module}: the plan says {t.in_features} -> {t.out_features} features, the model's "
                             f"layer has {feats[0]} -> {feats[1]}; was the plan made for another model?")
        columns = tuple(t.columns(r) for r in t.roles)
        if isinstance(layer, AdaMoLELinear):
            if name in layer.adapters:
                raise ValueError(f"{t.module} holds an adapter named {name!r} already; pick another "
                                 "adapter_name, or delete_adapter it first")
            added[t.module] = layer.new_group(t.roles, columns, config)
        else:
            built[t.module] = AdaMoLELinear(layer, t.roles, columns, config, name)
    return built, added


def swap_modules(model: nn.Module, targets: list[Target], config: AdaMoLEConfig,
                 name: str = "default") -> PassReport:
    """Run the pass on `model` in place; returns what it swapped (or added to)."""
    built, added = build_replacements(model, targets, config, name)
    for fqn, new in built.items():
        parent, child = _parent(model, fqn)
        setattr(parent, child, new)
    for fqn, group in added.items():
        model.get_submodule(fqn).add(name, group)
    return PassReport("swap_modules", targets=list(targets), rewritten=len(built) + len(added))


def unswap_modules(model: nn.Module) -> int:
    """Undo `swap_modules`: put every `AdaMoLELinear`'s base layer back. Returns how many were restored."""
    names = [n for n, m in model.named_modules() if isinstance(m, AdaMoLELinear)]
    for fqn in names:
        parent, child = _parent(model, fqn)
        setattr(parent, child, getattr(parent, child).base_layer)
    return len(names)
