"""Reach pass: would an adapter on each found projection run? (nn.Module models: a projection is adapted by
swapping its module. A graph's op nodes are inserted at the projection itself, wherever it is computed.)

Pattern:        every call of each target in the captured graph, with the modules whose forwards it was
                computed in (`node.meta["nn_module_stack"]`, which non-strict torch.export fills, for a whole
                model and for a block captured alone alike, with names relative to what was captured).
Replacement:    none; a target an adapter cannot reach becomes a `Skip` that keeps its roles:
                - `read_outside`: a module whose weight another module's forward reads (the parent's
                  `F.linear(x, self.q_proj.weight)`, fairseq's and OpenAI-CLIP's
                  `F.multi_head_attention_forward(..., self.q_proj.weight, ...)`): its own forward, where a
                  swapped-in adapter runs, is not on that path. A weight parametrization could carry only a
                  delta that does not depend on the input, not routed experts.
                - `bare_parameter`: a projection weight that is no module's `weight` (`F.linear(x, self.wq)`):
                  only a module can be swapped for an adapter. Each parameter is its own unit (`_fx.unit_of`).
                nn.MultiheadAttention is the exception on both counts: its in-projection parameters and its
                `out_proj`, read by its own forward, are adapted by rewriting its call (`model/attention.py`).
Preconditions:  targets come from `find_attention` / `find_mlp` on the same `GraphView`.
Invariants:     the graph is not modified; each target is kept or skipped (with its roles), in order.
"""

from __future__ import annotations

from torch import nn

from ..model.attention import IN_PROJ, OUT_PROJ
from ._fx import GraphView, LinearCall, op_name
from .targets import Skip, Target

MHA = f"{nn.MultiheadAttention.__module__}.{nn.MultiheadAttention.__qualname__}"
UNREACHABLE = ("read_outside", "bare_parameter")


class DeadAdapterError(ValueError):
    """An adapter that would never run, or did not run: a projection whose weight is read outside its own
    module's forward, a bare parameter, or an adapted module whose forward the model did not call."""


def reach(g: GraphView, targets: list[Target]) -> tuple[list[Target], list[Skip]]:
    """-> (the targets an adapter reaches, a skip per target it cannot reach)."""
    calls: dict[str, list[LinearCall]] = {}
    for node in g.graph.nodes:
        call = g.projection(node)
        if call is not None:
            calls.setdefault(call.module, []).append(call)
    kept, skipped = [], []
    for t in targets:
        why = next((w for w in map(_unreachable, calls.get(t.module, [])) if w is not None), None)
        if why is None:
            kept.append(t)
        else:
            skipped.append(Skip(t.module, why[0], why[1], t.roles))
    return kept, skipped


def _stack(call: LinearCall) -> list[tuple[str, str]] | None:
    """(module path, class name) of the forwards the call was computed in, outermost first (None: unknown)."""
    stack = call.node.meta.get("nn_module_stack")
    if not stack:
        return None
    return [(path, kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}")
            for path, kind in stack.values()]


def same_module(path: str, module: str) -> bool:
    """Does a module-stack path name `module`? Compared from the end: a stack path may hold a sliced
    ModuleList's segment (`layers.slice(None, 2, None).0`) where the module's name has the plain index."""
    a, b = path.split(".") if path else [], module.split(".") if module else []
    while a and b:
        x, y = a.pop(), b.pop()
        if "(" in x:
            return True
        if x != y:
            return False
    return not a and not b


def _short(kind: str) -> str:
    return kind.rpartition(".")[2]


def _unreachable(call: LinearCall) -> tuple[str, str] | None:
    """(reason, detail) when an adapter swapped in for the call's unit would not run for this call."""
    stack = _stack(call)
    if stack is None:
        return None
    owner, _, leaf = call.param.rpartition(".")
    reader_path, reader = stack[-1]
    mha = any(kind == MHA and same_module(path, owner) for path, kind in stack)
    if call.bare:
        if mha and leaf in IN_PROJ:
            return None
        return "bare_parameter", (
            f"a bare parameter, read by {_short(reader)}.forward through {op_name(call.node)}: only a module "
            "(nn.Linear, Conv1D) can be swapped for an adapter, not a parameter")
    if any(same_module(path, call.module) for path, _ in stack):
        return None
    if reader == MHA and leaf == "weight" and call.module.rpartition(".")[2] == OUT_PROJ \
            and same_module(reader_path, call.module.rpartition(".")[0]):
        return None
    return "read_outside", (
        f"its weight is read by {_short(reader)}.forward through {op_name(call.node)}, not by its own forward: "
        "an adapter swapped in for it would never run")
