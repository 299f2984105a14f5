"""Rewrite pass for nn.Module models: swap each planned projection for an `AdaMoLELinear`, in place.

Pattern:        a `Target` whose module is an nn.Linear or a GPT-2 Conv1D.
Replacement:    `parent.<name> = AdaMoLELinear(base_layer=<the original>, roles, columns, config)`; a fused
                projection gets one expert set and router per role, each writing its own columns.
Preconditions:  the targets come from `find_attention` on this model; none is adapted already.
Invariants:     all or nothing: every replacement is built before any is installed, so an error leaves the
                model as it was; base weights keep their tensors and move to `<module>.base_layer.*`; the
                adapted model's output at initialisation equals the base model's (B = 0).
"""

from __future__ import annotations

from torch import nn

from ..config import AdaMoLEConfig
from ..modules import AdaMoLELinear, AdapterGroup, linear_features
from .targets import PassReport, Target


class UnsupportedLayerError(TypeError):
    """A planned projection is a layer type the adapters cannot wrap."""


def _parent(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    parent_name, _, child = fqn.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def build_replacements(model: nn.Module, targets: list[Target], config: AdaMoLEConfig) -> dict[str, AdaMoLELinear]:
    """Build (without installing) the adapter module for each target; raises before touching the model."""
    built = {}
    for t in targets:
        try:
            layer = model.get_submodule(t.module)
        except AttributeError:
            raise ValueError(f"the plan targets {t.module}, which {type(model).__name__} does not have") from None
        if isinstance(layer, AdapterGroup):
            raise ValueError(f"{t.module} is adapted already; transform a fresh model (or use load_adapters)")
        feats = linear_features(layer)
        if feats is None:
            raise UnsupportedLayerError(
                f"cannot adapt {t.module}: it is a {type(layer).__module__}.{type(layer).__name__}, and only "
                "nn.Linear (and subclasses) and transformers Conv1D are supported; exclude it with "
                "AdaMoLEConfig(exclude=...)")
        if feats != (t.in_features, t.out_features):
            raise ValueError(f"{t.module}: the plan says {t.in_features} -> {t.out_features} features, the model's "
                             f"layer has {feats[0]} -> {feats[1]}; was the plan made for another model?")
        built[t.module] = AdaMoLELinear(layer, t.roles, tuple(t.columns(r) for r in t.roles), config)
    return built


def swap_modules(model: nn.Module, targets: list[Target], config: AdaMoLEConfig) -> PassReport:
    """Run the pass on `model` in place; returns what it swapped."""
    built = build_replacements(model, targets, config)
    for fqn, new in built.items():
        parent, child = _parent(model, fqn)
        setattr(parent, child, new)
    return PassReport("swap_modules", targets=list(targets), rewritten=len(built))


def unswap_modules(model: nn.Module) -> int:
    """Undo `swap_modules`: put every `AdaMoLELinear`'s base layer back. Returns how many were restored."""
    names = [n for n, m in model.named_modules() if isinstance(m, AdaMoLELinear)]
    for fqn in names:
        parent, child = _parent(model, fqn)
        setattr(parent, child, getattr(parent, child).base_layer)
    return len(names)
