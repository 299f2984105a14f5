"""The plan the discovery pass hands to the rewrites: `Target`s and a `PassReport`."""

from __future__ import annotations

import dataclasses


def compress(cols: list[int] | tuple[int, ...]) -> slice | tuple[int, ...]:
    """Sorted column indices -> slice(a, b) when contiguous, else the tuple itself."""
    cols = tuple(cols)
    if cols and cols == tuple(range(cols[0], cols[-1] + 1)):
        return slice(cols[0], cols[-1] + 1)
    return cols


def expand(cols: slice | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(range(cols.start, cols.stop)) if isinstance(cols, slice) else tuple(cols)


@dataclasses.dataclass(frozen=True)
class Target:
    """One projection to adapt.

    module        fully qualified module name, e.g. "model.layers.0.self_attn.q_proj"
    roles         the attention roles its output feeds, in q, k, v, o order, e.g. ("q",) or ("q", "k", "v")
    slices        per role, the output columns it owns: a slice, or a tuple of indices for strided layouts
    in_features   input width
    out_features  output width (all roles together)
    """

    module: str
    roles: tuple[str, ...]
    slices: tuple[slice | tuple[int, ...], ...]
    in_features: int
    out_features: int

    def columns(self, role: str) -> tuple[int, ...]:
        return expand(self.slices[self.roles.index(role)])

    def describe(self) -> str:
        parts = []
        for role, cols in zip(self.roles, self.slices, strict=True):
            if isinstance(cols, slice):
                parts.append(f"{role}[{cols.start}:{cols.stop}]")
            else:
                parts.append(f"{role}[{len(cols)} strided cols]")
        return f"{self.module}  {' '.join(parts)}  ({self.in_features} -> {self.out_features})"


@dataclasses.dataclass
class PassReport:
    """What a pass matched: attention sites found, targets planned, and what it skipped and why."""

    name: str
    anchors: int = 0
    rewritten: int = 0
    targets: list[Target] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)

    @property
    def matched(self) -> int:
        """Number of (module, role) sites."""
        return sum(len(t.roles) for t in self.targets)

    def summary(self) -> str:
        return (f"{self.name}: {self.anchors} attention site(s), {len(self.targets)} projection(s), "
                f"{self.matched} role site(s), {self.rewritten} call(s) rewritten, {len(self.skipped)} skipped")
