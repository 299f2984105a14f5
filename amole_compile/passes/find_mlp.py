"""Discovery pass for feed-forward projections: gate, up and down, found by structure.

Pattern:        projections (`_fx.as_linear`) that are not attention projections, whose output reaches the
                next projection D through an activation: `D(act(G x) * (U x))` (gated: G gate, U up, the side
                with the activation is the gate), `D(act(U x))` (two matrices: up, down), or one fused
                projection split into both sides of the product (Phi-3's `gate_up_proj`: each side's columns
                by index replay). D's input width must equal the up projection's output width (or half of a
                fused one), which keeps routers (E outputs) and shared-expert gates (1 output) out.
Replacement:    none; returns `Target(module, roles)` with roles among gate, up, down, and skip notes: MoE
                routers (a projection feeding top-k) are never adapted, and MoE experts stored as 3-D
                parameters cannot be wrapped as linears.
Preconditions:  as for `find_attention` (captured before decompositions, example values on the nodes).
Invariants:     the graph is not modified; no projection with an attention role is given an MLP role.
"""

from __future__ import annotations

from torch import fx

from ._columns import ColumnsUnknown, role_columns
from ._fx import LinearCall, meta_value, op_name, walk
from .targets import Target, compress

ACTIVATIONS = frozenset({"silu", "silu_", "gelu", "gelu_", "relu", "relu_", "tanh", "sigmoid", "mish", "elu",
                         "leaky_relu", "hardswish", "softplus", "relu6", "hardtanh", "glu", "selu", "celu"})
PRODUCTS = frozenset({"mul", "mul_"})
TOPK = frozenset({"topk", "sort", "argmax", "argsort"})


def _ancestors(node: fx.Node, stop: fx.Node, g) -> set[fx.Node]:
    """Data ancestors of `node` down to (and including) `stop`."""
    _, seen = walk(node, lambda n: [] if n is stop else g.flow.inputs(n), lambda n: False)
    return seen


def _has_activation(nodes: set[fx.Node]) -> bool:
    return any(op_name(n) in ACTIVATIONS for n in nodes)


def find_mlp(g, attention: set[str]) -> tuple[list[Target], list[str]]:
    """-> (feed-forward targets in graph order, skip notes). `g` is find_attention's `_Graph`; `attention` the
    modules that already hold an attention role."""
    order = g.flow.order
    projections = [n for n in g.graph.nodes if g.projection(n) is not None]
    is_proj = lambda n: g.projection(n) is not None  # noqa: E731
    found: dict[str, tuple[LinearCall, dict[str, tuple[int, ...]]]] = {}
    notes: list[str] = []
    for p in projections:
        call = g.projection(p)
        if call.module in attention or call.features is None:
            continue
        hits, fwd = walk(p, g.users, is_proj)
        if any(op_name(n) in TOPK for n in fwd - set(hits)):
            notes.append(f"{call.module}: an MoE router (its output feeds top-k); routers are never adapted")
            continue
        downs = [g.projection(h) for h in hits if g.projection(h).node is not p]
        if len(downs) != 1 or downs[0].module in attention or downs[0].features is None:
            continue
        down = downs[0]
        cone = _ancestors(down.input, p, g)
        if not _has_activation(cone):
            continue
        roles = _roles(p, call, cone, g)
        if roles is None or any(len(c) != down.features[0] for c in roles.values()):
            continue  # the product does not feed the down projection whole (a router, a scalar gate)
        entry = found.setdefault(call.module, (call, {}))
        entry[1].update(roles)
        found.setdefault(down.module, (down, {}))[1]["down"] = tuple(range(down.features[1]))
    notes += _expert_parameters(g)
    targets = []
    for module, (call, roles) in sorted(found.items(), key=lambda kv: order[kv[1][0].node]):
        if "gate" in roles and "up" in roles and set(roles["gate"]) & set(roles["up"]):
            roles = {"up": roles["up"]}  # both sides of the product read the same columns: x * act(x)
        names = tuple(r for r in ("gate", "up", "down") if r in roles)
        targets.append(Target(module, names, tuple(compress(sorted(roles[r])) for r in names), *call.features))
    return targets, notes


def _roles(p: fx.Node, call: LinearCall, cone: set[fx.Node], g) -> dict | None:
    """This projection's role(s) on the way to the down projection: gate (its side of the product has the
    activation), up, or both (a fused gate_up projection, split by column replay)."""
    out_f = call.features[1]
    is_proj = lambda n: g.projection(n) is not None  # noqa: E731

    def side(s: fx.Node) -> set[fx.Node]:  # s and its data ancestors back to the nearest projections
        hits, seen = walk(s, g.flow.inputs, is_proj)
        return seen - set(hits) | ({p} if p in hits else set())

    for node in sorted(cone, key=g.flow.order.__getitem__):
        if op_name(node) not in PRODUCTS:
            continue
        sides = [a for a in node.args[:2] if isinstance(a, fx.Node) and not _is_scalar(a)]
        if len(sides) != 2:
            continue
        cones = {s: side(s) for s in sides}
        mine = [s for s in sides if p in cones[s]]
        acts = {s: _has_activation(cones[s]) for s in sides}
        if not mine or acts[sides[0]] == acts[sides[1]]:
            continue
        if len(mine) == 2:  # fused gate_up: the columns of each side
            try:
                return {("gate" if acts[s] else "up"): tuple(sorted(
                    role_columns(p, out_f, cones[s], s, g.flow.order, g.params.constant))) for s in sides}
            except ColumnsUnknown:
                return None
        return {("gate" if acts[mine[0]] else "up"): tuple(range(out_f))}
    return {"up": tuple(range(out_f))}


def _is_scalar(node: fx.Node) -> bool:
    val = meta_value(node)
    return not hasattr(val, "shape") or val.numel() == 1


EXPERT_OPS = frozenset({"bmm", "matmul", "linear", "mm", "_grouped_mm", "grouped_mm", "grouped_mm_fallback", "einsum",
                        "baddbmm"})


def _expert_parameters(g) -> list[str]:
    """3-D parameters multiplied with activations (directly, or one expert at a time through indexing): MoE
    experts stacked as [E, ., .]; they are not linears and are left out."""
    notes = []
    for n in g.graph.nodes:
        name = g.params(n)
        shape = g.params.shape(n) if name is not None else None
        if shape is None or len(shape) != 3:
            continue
        _, reach = walk(n, lambda m, p=n: list(m.users) if m is p or op_name(m) in _SELECT else [],
                        lambda m: op_name(m) in EXPERT_OPS)
        if any(op_name(m) in EXPERT_OPS for m in reach):
            notes.append(f"{name}: MoE experts stored as a 3-D parameter {list(shape)}; only 2-D projections "
                         "can be adapted")
    return notes


_SELECT = frozenset({"select", "getitem", "index", "transpose", "permute", "t", "view", "reshape", "slice",
                     "expand", "unsqueeze", "to", "_to_copy", "contiguous", "numpy_T", "mT"})
