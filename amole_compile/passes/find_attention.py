"""Discovery pass: find the attention projections of a captured graph by structure, not by name.

Pattern:        an attention anchor — `scaled_dot_product_attention(q, k, v, ...)`, or eager attention's
                `matmul(q, kᵀ) -> {scale, mask, cast} -> softmax -> {dropout, cast} -> matmul(·, v)` (also
                `baddbmm` scores) — with q, k and v each reached backwards from a linear-like producer
                (`linear`, Conv1D's `addmm`, or a call to an nn.Linear / Conv1D module) through shape ops,
                casts and per-token arithmetic (rotary, scaling, repeat_kv, q/k norms, split/chunk/getitem),
                and o reached forwards from the attention output through shape ops and casts.
Replacement:    none; the pass returns a plan, a list of `Target(module, roles, slices, in, out)` in graph order.
                A fused QKV projection yields one target with a role per slice; its columns come from replaying
                the shape ops on an index tensor (`_columns.py`).
Preconditions:  the graph was captured before decompositions (linear and attention ops still visible); for
                fused projections its nodes carry example values (`meta["val"]`) so columns can be replayed.
Invariants:     the graph is not modified; every target's weight is a parameter; each role of a target owns
                a disjoint set of columns; module names are those of the captured model.
"""

from __future__ import annotations

import dataclasses

from torch import fx

from ._columns import ColumnsUnknown, role_columns
from ._fx import (
    ARITH_OPS,
    CAST_OPS,
    MATMUL_OPS,
    NORM_OPS,
    OUT_OPS,
    PROB_OPS,
    SCORE_OPS,
    SDPA_OPS,
    SHAPE_OPS,
    SOFTMAX_OPS,
    LinearCall,
    ParamNames,
    as_linear,
    op_name,
    tensor_args,
    walk,
)
from .targets import PassReport, Target, compress

ROLE_ORDER = ("q", "k", "v", "o")
_BACK_OPS = SHAPE_OPS | CAST_OPS | ARITH_OPS


@dataclasses.dataclass
class Anchor:
    """One attention computation: the node feeding each of q, k, v; its consumer; and the output node."""

    node: fx.Node
    inputs: dict[str, tuple[fx.Node, fx.Node]]  # role -> (tensor fed to attention, the node consuming it)
    out: fx.Node


def _sdpa_anchor(node: fx.Node) -> Anchor | None:
    args = node.args
    if len(args) < 3 or not all(isinstance(a, fx.Node) for a in args[:3]):
        return None
    return Anchor(node, {r: (args[i], node) for i, r in enumerate("qkv")}, node)


def _follow(start: fx.Node, ops: frozenset[str], target: frozenset[str], forward: bool) -> fx.Node | None:
    """First node with op in `target` reached from start through `ops` (forwards along users or backwards)."""
    def step(n: fx.Node) -> list[fx.Node]:
        if n is not start and op_name(n) not in ops:
            return []
        return list(n.users) if forward else tensor_args(n)

    hits, _ = walk(start, step, lambda n: op_name(n) in target)
    return hits[0] if hits else None


def _eager_anchor(softmax: fx.Node) -> Anchor | None:
    src = softmax.args[0] if softmax.args and isinstance(softmax.args[0], fx.Node) else None
    scores = _follow(src, SCORE_OPS, MATMUL_OPS | {"baddbmm"}, forward=False) if src is not None else None
    if src is not None and op_name(src) in MATMUL_OPS | {"baddbmm"}:
        scores = src
    pv = _follow(softmax, PROB_OPS, MATMUL_OPS, forward=True)
    if scores is None or pv is None or len(pv.args) < 2:
        return None
    qi = 1 if op_name(scores) == "baddbmm" else 0
    q, k, v = scores.args[qi], scores.args[qi + 1], pv.args[1]
    if not all(isinstance(t, fx.Node) for t in (q, k, v)):
        return None
    return Anchor(softmax, {"q": (q, scores), "k": (k, scores), "v": (v, pv)}, pv)


def find_anchors(graph: fx.Graph) -> list[Anchor]:
    """Every attention computation in the graph, in graph order."""
    anchors = []
    for node in graph.nodes:
        name = op_name(node)
        anchor = _sdpa_anchor(node) if name in SDPA_OPS else _eager_anchor(node) if name in SOFTMAX_OPS else None
        if anchor is not None:
            anchors.append(anchor)
    return anchors


def _producers(start: fx.Node, sink: fx.Node, params: ParamNames) -> list[tuple[LinearCall, set[fx.Node]]]:
    """Linear-like producers of `start` walking backwards, each with the cone of nodes between them."""
    direct = as_linear(start, params)
    if direct is not None:
        return [(direct, {start, sink})]

    def step(n: fx.Node) -> list[fx.Node]:
        if n is not start and op_name(n) not in _BACK_OPS:
            return []
        args = tensor_args(n)
        return args[:1] if op_name(n) in NORM_OPS else args

    hits, seen = walk(start, step, lambda n: as_linear(n, params) is not None)
    cone = seen | {sink}
    return [(as_linear(h, params), cone) for h in hits]


def _o_projection(out: fx.Node, params: ParamNames) -> LinearCall | None:
    """The linear that consumes the attention output (through shape ops and casts)."""
    def step(n: fx.Node) -> list[fx.Node]:
        if n is not out and op_name(n) not in OUT_OPS:
            return []
        return [u for u in n.users if as_linear(u, params) is None or as_linear(u, params).input is n]

    hits, _ = walk(out, step, lambda n: as_linear(n, params) is not None)
    return as_linear(hits[0], params) if hits else None


@dataclasses.dataclass
class _Found:
    call: LinearCall
    features: tuple[int, int]
    cones: dict[str, list[set[fx.Node]]] = dataclasses.field(default_factory=dict)


def _columns(found: _Found, report: PassReport) -> tuple[tuple[str, ...], tuple]:
    """Per role, the projection's output columns (replayed), made disjoint in role order."""
    out_f = found.features[1]
    roles = [r for r in ROLE_ORDER if r in found.cones]
    taken: set[int] = set()
    kept, slices = [], []
    for role in roles:
        if role == "o":
            cols = set(range(out_f))
        else:
            try:
                cols = set().union(*(role_columns(found.call.node, out_f, c) for c in found.cones[role]))
            except ColumnsUnknown as exc:
                if len(roles) > 1:
                    report.skipped.append(f"{found.call.module}: role {role} ({exc})")
                    continue
                cols = set(range(out_f))
        cols -= taken
        if not cols:
            report.skipped.append(f"{found.call.module}: role {role} shares all its columns with another role")
            continue
        taken |= cols
        kept.append(role)
        slices.append(compress(sorted(cols)))
    return tuple(kept), tuple(slices)


def find_attention(graph: fx.Graph, params: ParamNames) -> tuple[list[Target], PassReport]:
    """Run the pass: -> (targets in graph order, report)."""
    report = PassReport("find_attention")
    anchors = find_anchors(graph)
    report.anchors = len(anchors)
    found: dict[str, _Found] = {}

    def add(call: LinearCall, role: str, cone: set[fx.Node]) -> None:
        if call.features is None:
            report.skipped.append(f"{call.module}: the shape of its weight {call.param} is unknown")
            return
        entry = found.setdefault(call.module, _Found(call, call.features))
        entry.cones.setdefault(role, []).append(cone)

    for anchor in anchors:
        for role, (tensor, sink) in anchor.inputs.items():
            producers = _producers(tensor, sink, params)
            if not producers:
                report.skipped.append(f"{anchor.node.name}: no projection found for role {role}")
            for call, cone in producers:
                add(call, role, cone)
        o = _o_projection(anchor.out, params)
        if o is None:
            report.skipped.append(f"{anchor.node.name}: no projection found for role o")
        else:
            add(o, "o", set())
    order = {n: i for i, n in enumerate(graph.nodes)}
    targets = []
    for module, entry in sorted(found.items(), key=lambda kv: order[kv[1].call.node]):
        roles, slices = _columns(entry, report)
        if roles:
            targets.append(Target(module, roles, slices, *entry.features))
    report.targets = targets
    return targets, report
