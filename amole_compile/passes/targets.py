"""The values the passes hand each other: `Target` (one projection to adapt), `PassReport` (what a pass
matched) and `Plan` (what `amole_compile.plan` returns and `transform(..., plan=)` takes)."""

from __future__ import annotations

import dataclasses


def compress(cols: list[int] | tuple[int, ...]) -> slice | tuple[int, ...]:
    """Sorted column indices -> slice(a, b) when contiguous, else the tuple itself."""
    cols = tuple(cols)
    if cols and cols == tuple(range(cols[0], cols[-1] + 1)):
        return slice(cols[0], cols[-1] + 1)
    return cols


def expand(cols: slice | tuple[int, ...]) -> tuple[int, ...]:
    """A slice or tuple of columns -> the tuple of column indices."""
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
        """The output columns `role` owns."""
        return expand(self.slices[self.roles.index(role)])

    def describe(self) -> str:
        """One line: module, roles with their columns, and the projection's widths."""
        parts = []
        for role, cols in zip(self.roles, self.slices, strict=True):
            if isinstance(cols, slice):
                parts.append(f"{role}[{cols.start}:{cols.stop}]")
            else:
                parts.append(f"{role}[{len(cols)} strided cols]")
        return f"{self.module}  {' '.join(parts)}  ({self.in_features} -> {self.out_features})"


SKIP_REASONS = {
    "no_projection": "an attention site with no projection found for a role",
    "shape_unknown": "a projection whose weight shape is unknown",
    "columns_unknown": "a fused projection whose columns for a role could not be worked out",
    "columns_shared": "a role whose columns all belong to another role of the same projection",
    "moe_router": "an MoE router (indices are derived from its scores): never adapted",
    "param_3d": "a role computed by a parameter of more than 2 dimensions (stacked experts, per-head weights)",
    "router_reached": "a router reached from an attention role (its values are decisions): never given the role",
    "moe_experts": "MoE experts stored as a 3-D parameter: not a linear, cannot be wrapped",
    "include": "a projection whose name does not match AdaMoLEConfig.include",
    "exclude": "a projection whose name matches AdaMoLEConfig.exclude",
    "not_captured": "a block that did not export (its submodules may have been captured instead)",
    "read_outside": "a module whose weight another module's forward reads: an adapter swapped in would never run",
    "bare_parameter": "a projection weight that is no module's `weight` (F.linear(x, self.wq)): not swappable",
    "probe_failed": "a projection fed by others through ops with a size that depends on values (rows a mask "
                    "picks), which could not be probed: not known to be a feed-forward's",
}


@dataclasses.dataclass(frozen=True)
class Skip:
    """Something discovery or selection left out, and why.

    module   the module (or, for an attention site, the graph node; for a bare parameter, the parameter) it
             concerns, fully qualified
    reason   one of `SKIP_REASONS`
    detail   the specifics, readable (`str(skip)` is "module: detail")
    roles    the roles a projection left out would have had (`read_outside`, `bare_parameter`), else ()
    """

    module: str
    reason: str
    detail: str
    roles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.reason not in SKIP_REASONS:
            raise ValueError(f"Skip.reason must be one of {sorted(SKIP_REASONS)}, got {self.reason!r}")

    def __str__(self) -> str:
        roles = f" (roles {' '.join(self.roles)})" if self.roles else ""
        return f"{self.module}{roles}: {self.detail}"

    def within(self, block: str) -> Skip:
        """This skip, for the same module inside block `block` (its name prefixed)."""
        return dataclasses.replace(self, module=f"{block}.{self.module}")


@dataclasses.dataclass
class PassReport:
    """What a pass matched: attention sites found, targets planned, and what it skipped and why."""

    name: str
    anchors: int = 0
    rewritten: int = 0
    targets: list[Target] = dataclasses.field(default_factory=list)
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    blocks: dict[str, str] = dataclasses.field(default_factory=dict)  # block -> what was found in it (per block)
    shared: dict[str, int] = dataclasses.field(default_factory=dict)  # module -> blocks (calls) sharing it, if > 1

    def add_block(self, name: str, found: str, modules: list[str], calls: int) -> None:
        """Record a block (what was found in it); a block called `calls` > 1 times (ALBERT: one layer's
        parameters for every layer) counts its attention sites that many times and shares its targets."""
        if calls > 1:
            found += f"; called {calls} times: its {len(modules)} projection(s) are shared by {calls} blocks"
            self.shared.update(dict.fromkeys(modules, calls))
        self.blocks[name] = found

    @property
    def matched(self) -> int:
        """Number of (module, role) sites."""
        return sum(len(t.roles) for t in self.targets)

    def summary(self) -> str:
        """One line: what the pass matched, rewrote and skipped."""
        return (f"{self.name}: {self.anchors} attention site(s), {len(self.targets)} projection(s), "
                f"{self.matched} role site(s), {self.rewritten} call(s) rewritten, {len(self.skipped)} skipped")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `amole_compile.plan(model, config)` found, ready for `transform(model, config, plan=...)`.

    model      the model's class name
    targets    the projections that will be adapted (after the config's roles / include / exclude)
    report     the discovery report: attention sites, every projection found, and what was skipped and why

    Read it (`print(plan.describe())`), narrow it (`plan.filter(...)` or `dataclasses.replace(plan,
    targets=...)`), and hand it to `transform`, which then adapts exactly these targets without capturing again.
    """

    model: str
    targets: list[Target]
    report: PassReport

    def filter(self, roles: tuple[str, ...] | None = None, modules=None) -> Plan:
        """A plan keeping only `roles` (all if None) and the targets for which `modules(name)` is true."""
        kept = []
        for t in self.targets:
            if modules is not None and not modules(t.module):
                continue
            pairs = [(r, s) for r, s in zip(t.roles, t.slices, strict=True) if roles is None or r in roles]
            if pairs:
                kept.append(Target(t.module, tuple(r for r, _ in pairs), tuple(s for _, s in pairs),
                                   t.in_features, t.out_features))
        return dataclasses.replace(self, targets=kept)

    def describe(self) -> str:
        """A readable listing: one line per target, then the skipped items."""
        lines = [f"{self.model}: {self.report.anchors} attention site(s), {len(self.targets)} target(s)"]
        lines += [f"  block {name}: {found}" for name, found in self.report.blocks.items()]
        lines += [f"  {t.describe()}" + (f"  shared by {self.report.shared[t.module]} blocks (one adapter, trained "
                                         "by all)" if t.module in self.report.shared else "") for t in self.targets]
        lines += [f"  skipped: {s}" for s in self.report.skipped]
        return "\n".join(lines)
