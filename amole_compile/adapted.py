"""What a transformed model holds: its adapted projections, the named adapters on them, their targets, whether
it is transformed at all.

Read-only views of a model that the verbs (`core`, `named`), the adapter files (`adapter_files`) and the HF
hooks (`model_hooks`) all need; it imports nothing above `projection` and the passes' data types.
"""

from __future__ import annotations

from torch import nn

from .modules import AdapterGroup
from .passes.insert_ops import PREFIX
from .passes.targets import Target, compress
from .projection import ProjectionAdapters

ACTIVE = "_amole_active"  # model.__dict__ entry: the active adapter's name (None: the base model runs)


def is_transformed(model: nn.Module) -> bool:
    """Does `model` hold AdaMoLE adapters (from `transform` or `load_adapters`)?"""
    return any(isinstance(m, ProjectionAdapters) for m in model.modules())


def projections(model: nn.Module) -> list[tuple[str, ProjectionAdapters]]:
    """(module name, its adapters) for every adapted projection, in model order (graph path names unprefixed)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, ProjectionAdapters):
            out.append((name[len(PREFIX) + 1:] if name.startswith(PREFIX + ".") else name, mod))
    return out


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters `model` holds, in the order they were added."""
    names: dict[str, None] = {}
    for _, proj in projections(model):
        names.update(dict.fromkeys(proj.adapters))
    return list(names)


def active_adapter(model: nn.Module) -> str | None:
    """The name of the adapter the model computes with (None: none, the base model runs)."""
    if ACTIVE in model.__dict__:
        return model.__dict__[ACTIVE]
    names = adapter_names(model)
    return names[0] if names else None


def check_name(model: nn.Module, name: str) -> str:
    """`name` if the model holds that adapter, else ValueError naming the known ones."""
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"unknown adapter {name!r}; {type(model).__name__} holds {names or 'no adapters'}")
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
