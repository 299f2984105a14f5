"""What a transformed model holds: its adapter groups, their targets, whether it is transformed at all.

Read-only views of a model that the verbs (`core`), the adapter files (`adapter_files`) and the HF hooks
(`model_hooks`) all need; it imports nothing above `modules` and the passes' data types.
"""

from __future__ import annotations

from torch import nn

from .modules import AdapterGroup
from .passes.insert_ops import PREFIX
from .passes.targets import Target, compress


def is_transformed(model: nn.Module) -> bool:
    """Does `model` hold AdaMoLE adapters (from `transform` or `load_adapters`)?"""
    return any(isinstance(m, AdapterGroup) for m in model.modules())


def adapter_groups(model: nn.Module) -> list[tuple[str, AdapterGroup]]:
    """(module name, group) for every adapted projection, in model order (graph path names unprefixed)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, AdapterGroup):
            out.append((name[len(PREFIX) + 1:] if name.startswith(PREFIX + ".") else name, mod))
    return out


def targets(model: nn.Module) -> list[Target]:
    """The adapted projections of a transformed model, as `Target(module, roles, slices, in, out)`."""
    return [Target(name, g.roles, tuple(compress(c) for c in g.columns), g.in_features, g.out_features)
            for name, g in adapter_groups(model)]
