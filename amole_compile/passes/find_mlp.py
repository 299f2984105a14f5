"""Discovery pass for feed-forward projections: gate, up and down, found by what the ops between them compute.

Pattern:        a projection D (`_fx.as_linear`, not an attention projection) whose input is an elementwise
                function f of the nearest projections S behind it (each element of S moves at most one element
                of D's input: no norm, reduction, matmul or attention on the way), tested by running the ops on
                probe values (`_probe.py`), whatever ops they are. Then, by how f responds:
                - one projection U, f not affine in it: a two-matrix MLP, U up (GPT-2, BERT, OPT, any
                  activation);
                - several projections: f affine in U (the plain side of the product) and not affine in G (the
                  side through an activation): G gate, U up (`act(G x) * (U x)`, `g.sigmoid() * g * u`, ...);
                - one projection whose columns split into the two sides of a product (Phi-3's `gate_up_proj`):
                  each side's columns by index replay (`_columns.py`), gate the side f is not affine in.
                A feed-forward maps the hidden state back to its width: its sides are the sources whose input is
                as wide as D's output (Gemma3n's AltUp coefficients, 64 -> 4 -> tanh -> 16, have none); a source
                of another width (Zamba2's low-rank adapter added to its gate_up_proj) is held fixed.
                An MoE router is a projection from whose output an integer tensor is derived (its scores become
                the indices of a top-k / argmax / sort selection); stacked experts are 3-D parameters whose
                leading dimension is a router's number of outputs.
Replacement:    none; returns `Target(module, roles)` with roles among gate, up, down, and skip notes: routers are
                never adapted, 3-D expert parameters cannot be wrapped as linears.
Preconditions:  as for `find_attention` (captured before decompositions, example values on the nodes).
Invariants:     the graph is not modified; no projection with an attention role is given an MLP role; f is
                never affine in every projection (no activation: not an MLP, e.g. MLA's low-rank pairs, which
                also have a norm between them).
"""

from __future__ import annotations

from torch import fx

from ._columns import ColumnsUnknown, role_columns
from ._fx import LinearCall, walk
from ._probe import Probe, ProbeFailed
from ._routing import EXPERTS_NOTE, ROUTER_NOTE, router_calls
from .targets import Skip, Target, compress


def find_mlp(g, attention: set[str]) -> tuple[list[Target], list[Skip]]:
    """-> (feed-forward targets in graph order, what was skipped). `g` is the graph's `GraphView`; `attention`
    the modules that already hold an attention role."""
    routers = _routers(g, attention)
    notes = [Skip(r.module, "moe_router", ROUTER_NOTE) for r in routers] + \
        _experts(g, {r.features[1] for r in routers if r.features})
    taken = attention | {r.module for r in routers}
    found: dict[str, tuple[LinearCall, dict[str, list[int]]]] = {}
    for node in g.graph.nodes:
        down = g.projection(node)
        if down is None or down.module in taken or down.features is None:
            continue
        roles = _feed_forward(g, down, taken, notes)
        if not roles:
            continue
        for call, rs in roles:  # each call's columns -> its parameter's output lines
            found.setdefault(call.module, (call, {}))[1].update({r: call.lines(c) for r, c in rs.items()})
        found.setdefault(down.module, (down, {}))[1]["down"] = down.lines()
    order = g.flow.order
    targets = []
    for module, (call, roles) in sorted(found.items(), key=lambda kv: order[kv[1][0].node]):
        names = tuple(r for r in ("gate", "up", "down") if r in roles)
        targets.append(Target(module, names, tuple(compress(sorted(roles[r])) for r in names), *call.features))
    return targets, notes


def _sources(g, down: LinearCall) -> list[fx.Node]:
    """The nearest projections behind D's input."""
    if g.projection(down.input) is not None:
        return [down.input]
    hits, _ = walk(down.input, g.flow.inputs, lambda n: g.projection(n) is not None)
    return list(dict.fromkeys(hits))


def _feed_forward(g, down: LinearCall, taken: set[str],
                  notes: list[Skip]) -> list[tuple[LinearCall, dict[str, list[int]]]] | None:
    """[(projection, {role: columns})] feeding D as an MLP, or None (with a note in `notes` when the ops between
    could not be probed for a size that depends on values: an MLP on rows picked by a mask, X-MOD's language
    adapters)."""
    sources = _sources(g, down)
    calls = [g.projection(s) for s in sources]
    if not calls or any(c.module in taken or c.features is None for c in calls):
        return None
    # the sides read the hidden state D writes back; a projection of something narrower beside them (Zamba2's
    # per-layer low-rank adapter added to gate_up_proj) is held fixed, as any other input
    calls = [c for c in calls if c.features[0] == down.features[1]]
    sources = [c.node for c in calls]
    if not calls:
        return None  # (not hidden -> hidden: not a feed-forward)
    probe = Probe(g, sources, down.input)
    try:
        if not probe.elementwise():
            return None
        if len(sources) == 1:
            return _single(g, probe, calls[0])
        affine = {s: probe.affine(s) for s in sources}
    except ProbeFailed as exc:
        if exc.sized_by_values:  # (not ops the probe cannot run, as a Mamba mixer's integer masks: no MLP there)
            notes.append(Skip(down.module, "probe_failed", f"fed by {', '.join(c.module for c in calls)}, through "
                              f"ops that could not be probed ({exc}): not known to be a feed-forward's"))
        return None
    if all(affine.values()) or not any(affine.values()):
        return None  # no activation (bilinear), or no plain side
    return [(c, {("up" if affine[c.node] else "gate"): list(range(c.width))}) for c in calls]


def _single(g, probe: Probe, call: LinearCall) -> list[tuple[LinearCall, dict[str, list[int]]]] | None:
    """One projection behind D: a fused gate_up (its columns split over a product), else up."""
    split = _split(g, probe, call)
    if split is None:
        return None if probe.affine(call.node) else [(call, {"up": list(range(call.width))})]
    gates = [cols for cols in split if not probe.affine(call.node, cols)]
    ups = [cols for cols in split if cols not in gates]
    if len(gates) != 1 or len(ups) != 1:
        return None
    return [(call, {"gate": gates[0], "up": ups[0]})]


def _split(g, probe: Probe, call: LinearCall) -> tuple[list[int], list[int]] | None:
    """The first op on the way with two inputs carrying disjoint column sets of the projection -> the two sets."""
    inside = set(probe.nodes) | {call.node}
    is_proj = lambda n: g.projection(n) is not None  # noqa: E731
    for node in probe.nodes:
        sides = [a for a in dict.fromkeys(g.flow.inputs(node)) if a in inside]
        if len(sides) != 2:
            continue
        try:
            cols = [role_columns(call.node, call.width, walk(s, g.flow.inputs, is_proj)[1], s,
                                 g.flow.order, g.params.constant) for s in sides]
        except ColumnsUnknown:
            return None
        if all(cols) and not cols[0] & cols[1]:
            return sorted(cols[0]), sorted(cols[1])
    return None


def _routers(g, attention: set[str]) -> list[LinearCall]:
    """The router calls (`_routing.router_calls`) of modules without an attention role."""
    return [call for call in router_calls(g).values() if call.module not in attention]


def _experts(g, widths: set[int]) -> list[Skip]:
    """3-D parameters stacked along a router's expert axis: experts; they are not linears and are left out."""
    notes = []
    for n in g.graph.nodes:
        name = g.params(n)
        shape = g.params.shape(n) if name is not None else None
        if shape is not None and len(shape) == 3 and shape[0] in widths:
            notes.append(Skip(name, "moe_experts", f"{EXPERTS_NOTE} {list(shape)}; only 2-D projections can be "
                              "adapted"))
    return notes
