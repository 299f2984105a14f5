"""Discovery pass: find the attention projections of a captured graph by dataflow, not by op or module names.

Pattern:        an attention core — `scaled_dot_product_attention(q, k, v, ...)`, or eager attention: a score
                product of two activations (`matmul` / `bmm` / `baddbmm` / `einsum`) -> any ops -> softmax ->
                any ops -> a value product (score products behind the softmax: those whose last two sizes are
                the probabilities', or all of them where none is: banded sliding-window attention, Longformer's
                and LED's [B, S, H, 2w + 1]). From each operand the pass walks back along data edges (`DataFlow`:
                tensor arguments that carry data, in-place writes into buffers included, metadata-only
                arguments such as `type_as`'s second or `new_empty`'s template excluded) through any op that
                is not a projection, to the nearest projections; the role is the operand's (query or key side
                of the score product, value side of the value product). o is the first projection reached
                forward from the attention output through any ops (gates, reshapes, casts) before it rejoins
                the stream the attention read (`_stream`: a residual add; past it, the projection would be the
                next block's: an attention without o has none). A projection is any
                node multiplying its input by a 2-D parameter (`as_linear`: linear, addmm, mm / matmul / bmm
                with the weight read directly or through a transpose, Conv1D).
Replacement:    none; the pass returns a plan, a list of `Target(module, roles, slices, in, out)` in graph order.
                A projection feeding several roles yields one target with a role per column set; the column
                sets come from replaying the path on index tensors (`_columns.py`); a role fed by two
                projections (MLA's k) gives each its columns under that role.
Preconditions:  the graph was captured before decompositions (linear and attention ops still visible); its
                nodes carry example values (`meta["val"]`) so that column sets can be replayed.
Invariants:     the graph is not modified; every target's weight is a parameter; each role of a target owns
                a disjoint set of columns; module names are those of the captured model; a parameter shared
                by several blocks is one target.
"""

from __future__ import annotations

import dataclasses

from torch import fx

from ._columns import ColumnsUnknown, role_columns
from ._fx import (
    MATMUL_OPS,
    SDPA_OPS,
    SOFTMAX_OPS,
    GraphView,
    LinearCall,
    ParamNames,
    concrete_shape,
    meta_value,
    op_name,
    walk,
)
from ._routing import ROUTER_NOTE, WIDE_NOTE, carries_values, router_calls, wide_param_readers
from .targets import PassReport, Skip, Target, compress

ROLE_ORDER = ("q", "k", "v", "o")  # attention roles (feed-forward roles: find_mlp.py)


@dataclasses.dataclass
class Anchor:
    """One attention computation: the node feeding each of q, k, v; and the output node."""

    node: fx.Node
    inputs: dict[str, list[fx.Node]]  # role -> the tensors fed to attention in that role
    out: fx.Node


def _shape(node: object) -> tuple[int, ...] | None:
    return concrete_shape(meta_value(node))


def _operands(node: fx.Node) -> list[fx.Node]:
    """The two activation operands of a product (einsum's come as a list)."""
    name = op_name(node)
    if name == "einsum":
        ops = node.args[1] if len(node.args) > 1 else []
        return [a for a in ops if isinstance(a, fx.Node)]
    args = node.args[1:3] if name == "baddbmm" else node.args[:2]
    return [a for a in args if isinstance(a, fx.Node)]


def _softmax_axis(softmax: fx.Node) -> int | None:
    """The axis a softmax normalises over, counted from the end (-1 last), or None if unknown."""
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    rank = len(_shape(softmax.args[0]) or ()) if softmax.args else 0
    if not isinstance(dim, int) or not rank:
        return None
    return dim - rank if dim >= 0 else dim


def _query_key(scores: fx.Node, axis: int | None) -> tuple[fx.Node, fx.Node] | None:
    """(query side, key side) of a score product. The keys are the axis the softmax normalises over (`axis`,
    counted from the end, views of leading dimensions and sink columns in between keep it): the operand that
    gives the product that axis is the key side, whatever the argument order (`k @ qᵀ` with softmax over -2)."""
    ops = _operands(scores)
    if len(ops) != 2:
        return None
    axis = -1 if axis not in (-1, -2) else axis
    if op_name(scores) == "einsum" and isinstance(scores.args[0], str) and "->" in scores.args[0]:
        lhs, out = scores.args[0].replace(" ", "").split("->")
        subs = lhs.split(",")
        if len(subs) == 2 and len(out) >= -axis:
            key = out[axis]
            if key in subs[0] and key not in subs[1]:
                return ops[1], ops[0]
            return ops[0], ops[1]
    return (ops[1], ops[0]) if axis == -2 else (ops[0], ops[1])


def _eager_anchor(softmax: fx.Node, g: GraphView) -> Anchor | None:
    """softmax -> its value product (forwards) and score products (backwards), through any ops."""
    hits, fwd = walk(softmax, g.users, lambda n: g.projection(n) is not None or op_name(n) in MATMUL_OPS)
    pv = next((h for h in hits if g.projection(h) is None), None)
    if pv is None:
        return None
    ops = _operands(pv)
    probs = [a for a in ops if a in fwd]
    values = [a for a in ops if a not in fwd]
    if len(probs) != 1 or len(values) != 1:
        return None
    hits, _ = walk(softmax, g.flow.inputs, lambda n: g.projection(n) is not None or op_name(n) in MATMUL_OPS)
    want = _shape(probs[0])
    products = [h for h in hits if g.projection(h) is None]
    scores = [h for h in products
              if want is None or _shape(h) is None or sorted(_shape(h)[-2:]) == sorted(want[-2:])]
    pairs = [qk for qk in (_query_key(h, _softmax_axis(softmax)) for h in scores or products) if qk is not None]
    if not pairs:
        return None
    return Anchor(softmax, {"q": [q for q, _ in pairs], "k": [k for _, k in pairs], "v": values}, pv)


def _first_output(node: fx.Node) -> fx.Node:
    """The attention output of an op that returns a tuple (out, logsumexp, ...: flex attention, the fused SDPA
    kernels): its `getitem(node, 0)`; the node itself when it returns one tensor (or nothing reads item 0)."""
    if not isinstance(meta_value(node), (tuple, list)):
        return node
    return next((u for u in node.users if op_name(u) == "getitem" and u.args[1:2] == (0,)), node)


def find_anchors(graph: fx.Graph, params: ParamNames | None = None, g: GraphView | None = None) -> list[Anchor]:
    """Every attention computation in the graph, in graph order."""
    g = g or GraphView(graph, params or ParamNames(None))
    anchors = []
    for node in graph.nodes:
        name = op_name(node)
        if name in SDPA_OPS and len(node.args) >= 3 and all(isinstance(a, fx.Node) for a in node.args[:3]):
            anchors.append(Anchor(node, {r: [node.args[i]] for i, r in enumerate("qkv")}, _first_output(node)))
        elif name in SOFTMAX_OPS:
            anchor = _eager_anchor(node, g)
            if anchor is not None:
                anchors.append(anchor)
    return anchors


@dataclasses.dataclass
class _Found:
    call: LinearCall  # its first call
    features: tuple[int, int]
    paths: dict[str, list[tuple[LinearCall, fx.Node | None, set[fx.Node]]]] = dataclasses.field(default_factory=dict)


def _role_lines(role: str, found: _Found, g: GraphView) -> set[int]:
    """The parameter's output lines that reach `role` along its paths (replayed on each call's columns)."""
    if role == "o":
        return {line for call, _, _ in found.paths[role] for line in call.lines()}
    lines: set[int] = set()
    for call, tensor, cone in found.paths[role]:
        cols = role_columns(call.node, call.width, cone, tensor, g.flow.order, g.params.constant)
        lines.update(call.lines(sorted(cols)))
    return lines


def _columns(found: _Found, g: GraphView, report: PassReport) -> tuple[tuple[str, ...], tuple]:
    """Per role, the projection's output columns (replayed), made disjoint in role order."""
    roles = [r for r in ROLE_ORDER if r in found.paths]
    taken: set[int] = set()
    kept, slices = [], []
    for role in roles:
        try:
            cols = _role_lines(role, found, g)
        except ColumnsUnknown as exc:
            if len(roles) > 1:
                report.skipped.append(Skip(found.call.module, "columns_unknown", f"role {role} ({exc})"))
                continue
            cols = set(range(found.features[1]))
        cols -= taken
        if not cols:
            report.skipped.append(Skip(found.call.module, "columns_shared",
                                       f"role {role} shares all its columns with another role"))
            continue
        taken |= cols
        kept.append(role)
        slices.append(compress(sorted(cols)))
    return tuple(kept), tuple(slices)


def find_attention(g: GraphView) -> tuple[list[Target], PassReport]:
    """Run the pass on a graph's view: -> (targets in graph order, report)."""
    report = PassReport("find_attention")
    anchors = find_anchors(g.graph, g=g)
    report.anchors = len(anchors)
    found: dict[str, _Found] = {}

    def add(call: LinearCall, role: str, tensor: fx.Node | None, cone: set[fx.Node]) -> None:
        if call.features is None:
            report.skipped.append(Skip(call.module, "shape_unknown", f"the shape of its weight {call.param} is "
                                       "unknown"))
            return
        entry = found.setdefault(call.module, _Found(call, call.features))
        entry.paths.setdefault(role, []).append((call, tensor, cone))

    is_proj = lambda n: g.projection(n) is not None  # noqa: E731
    routers, wide = router_calls(g), wide_param_readers(g)
    stop = lambda n: is_proj(n) or n in wide  # noqa: E731
    back = lambda n: [a for a in g.flow.inputs(n) if carries_values(a)]  # noqa: E731
    ahead = lambda n: [u for u in g.users(n) if carries_values(u)]  # noqa: E731

    def not_routers(procs: list[fx.Node]) -> list[fx.Node]:
        """The projections reached forward, less the routers (reported): where the real o is no projection, the
        first one downstream can be the next MoE's router, whose values are decisions."""
        for p in procs:
            if p in routers and p not in seen_routers:
                seen_routers.add(p)
                report.skipped.append(Skip(routers[p].module, "router_reached", f"reached from role o, but "
                                           f"{ROUTER_NOTE}"))
        return [p for p in procs if p not in routers]

    seen_routers: set[fx.Node] = set()
    for anchor in anchors:
        sources: list[fx.Node] = []  # the projections' inputs: the stream the attention reads
        for role, tensors in anchor.inputs.items():
            hits, blocked = [], []
            for tensor in tensors:
                reached, cone = ([tensor], {tensor}) if stop(tensor) else walk(tensor, back, stop)
                procs = [p for p in reached if is_proj(p)]
                for p in procs:
                    add(g.projection(p), role, tensor, cone)
                hits += procs
                blocked += [p for p in reached if p in wide]
                sources += [g.projection(p).input for p in procs]
            if not hits:
                report.skipped.append(_none_found(anchor, role, blocked, wide))
        reached = _forward_to_o(anchor.out, _stream(sources, back, stop), g, ahead, stop)
        procs = not_routers([p for p in reached if is_proj(p) and g.projection(p).node is not anchor.out])
        if not procs:
            report.skipped.append(_none_found(anchor, "o", [p for p in reached if p in wide], wide))
        for p in procs[:1]:
            add(g.projection(p), "o", None, set())
    order = g.flow.order
    targets = []
    for module, entry in sorted(found.items(), key=lambda kv: order[kv[1].call.node]):
        roles, slices = _columns(entry, g, report)
        if roles:
            targets.append(Target(module, roles, slices, *entry.features))
    report.targets = targets
    return targets, report


def _stream(sources: list[fx.Node], back, stop) -> set[fx.Node]:
    """The stream the attention read: its projections' inputs and everything they come from through ops that are
    not projections (the block's input before its norm, the residual stream before it). o is reached from the
    attention output before the output rejoins this stream: past a residual add it would be the next block's
    first projection (an attention without o, a hand-written block that merges heads straight into the
    residual)."""
    stream: set[fx.Node] = set()

    def known(n: fx.Node) -> bool:
        return n in stream or stop(n)

    for node in sources:
        if node not in stream:
            stream.update(walk(node, back, known)[1])
    return stream


def _forward_to_o(out: fx.Node, stream: set[fx.Node], g: GraphView, ahead, stop) -> list[fx.Node]:
    """The nodes the walk forward from the attention output `out` stops at: projections, and the nodes where it
    rejoins `stream` (which read a node of it)."""
    return walk(out, ahead, lambda n: stop(n) or any(a in stream for a in g.flow.inputs(n)))[0]


def _none_found(anchor: Anchor, role: str, blocked: list[fx.Node], wide: dict) -> Skip:
    """No projection computes `role`: say so, naming the parameter of 3 or more dimensions that does where the walk
    stopped at one (`blocked`, nearest first: JetMoE's expert q and o, XLNet's per-head q, k, v and o)."""
    if blocked:
        name, shape = wide[blocked[0]]
        return Skip(name, "param_3d", f"computes role {role}: {WIDE_NOTE} {shape}; only 2-D projections can be "
                    "adapted")
    return Skip(anchor.node.name, "no_projection", f"no projection found for role {role}")
