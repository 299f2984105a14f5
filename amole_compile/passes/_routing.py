"""What routing looks like in a captured graph, for the discovery passes: which tensors carry decisions rather
than values, and which projections are routers.

- An integer tensor holds positions or counts (indices, top-k selections, tokens per expert), a bool tensor
  holds decisions (masks). A projection's values never reach an attention role through one, so the role walks
  (`find_attention`) do not step along them: JetMoE's q, computed by routed experts, is not its router's.
- A router is a projection from whose output an integer tensor is derived, and used, before any other
  projection (its scores become the indices of a top-k / argmax / sort selection: an MoE gate, a
  mixture-of-attention gate). An integer output nothing reads is no selection: attention with sinks takes
  `max(dim)`, whose indices go unused. A router is never a feed-forward role (`find_mlp`), nor the o that
  `find_attention` reaches downstream where the real o is no projection (MoE experts); both report it.
- A product by a parameter of more than 2 dimensions (stacked experts, per-head weights) is a projection no
  adapter can wrap: the role walks stop there and report it, instead of passing it to call the next
  projection along (the next block's MLP) that role.
"""

from __future__ import annotations

import torch
from torch import fx

from ._fx import MATMUL_OPS, is_view, meta_value, op_name, walk

EXPERTS_NOTE = "MoE experts stored as a 3-D parameter"
WIDE_NOTE = "a parameter of more than 2 dimensions (stacked experts, or per-head weights)"
ROUTER_NOTE = "an MoE router (top-k / argmax indices are derived from its output); routers are never adapted"


def is_index(node: fx.Node) -> bool:
    """Is the node's example value an integer tensor (indices, counts)?"""
    val = meta_value(node)
    return isinstance(val, torch.Tensor) and not (val.dtype.is_floating_point or val.dtype.is_complex
                                                  or val.dtype == torch.bool)


def carries_values(node: fx.Node) -> bool:
    """Can the node's values be an activation: not an integer or bool tensor (unknown values count as can)?"""
    val = meta_value(node)
    return not isinstance(val, torch.Tensor) or val.dtype.is_floating_point or val.dtype.is_complex


def router_calls(g) -> dict[fx.Node, object]:
    """{projection node: its `LinearCall`} for every projection call of the graph view `g` that is a router;
    found once per view (`find_attention` and `find_mlp` both ask)."""
    if "routers" not in g.memo:
        g.memo["routers"] = _routers(g)
    return g.memo["routers"]


def _routers(g) -> dict[fx.Node, object]:
    out = {}
    for node in g.graph.nodes:
        call = g.projection(node)
        if call is None:
            continue
        _, reach = walk(node, g.users, lambda n: g.projection(n) is not None)
        if any(is_index(n) and n.users for n in reach):  # (not an unused `max(dim).indices`: gpt-oss sinks)
            out[node] = call
    return out


def wide_param_readers(g) -> dict[fx.Node, tuple[str, list[int]]]:
    """{node: (parameter name, shape)} for each product (linear, matmul, einsum, ...) by a parameter of more than
    2 dimensions, read directly or through views (an expert's `W[e]`, XLNet's per-head `einsum` weights): a
    projection no adapter can wrap. The role walks stop there instead of passing it for the next projection."""
    out: dict[fx.Node, tuple[str, list[int]]] = {}
    for n in g.graph.nodes:
        name = g.params(n)
        shape = g.params.shape(n) if name is not None else None
        if shape is None or len(shape) < 3:
            continue
        readers, _ = walk(n, lambda m: list(m.users), lambda m: not is_view(m))
        for r in readers:
            if op_name(r) in MATMUL_OPS or op_name(r) == "linear":
                out.setdefault(r, (name, list(shape)))
    return out
