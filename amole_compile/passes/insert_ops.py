"""Rewrite pass for graphs: insert AdaMoLE op nodes after each planned projection of a GraphModule.

Pattern:        a linear-like node (`linear`, Conv1D `addmm`, or a call to an nn.Linear / Conv1D module) whose
                weight belongs to a planned `Target` (a module's `weight`, or a bare parameter); every call of
                it is rewritten, a call reading a slice of the weight's output lines getting those columns.
Replacement:    y = proj(x)  ->  per role: mask = site.drop_mask(x2); r = torch.ops.amole.adapter(x2, mask, ...,
                site.wants_aux()); site.record(r[1], r[2], aux=r[5]); then y' = y + the role deltas placed in
                their columns (or, for a single role owning every column, the op adds itself to y). Users of y
                read y'. Every inserted node has
                `meta["amole"] = {"module": ..., "role": ...}`. Parameters live in `gm._amole.<module>`, a
                `ProjectionAdapters` holding one `AdapterGroup` named "default", so adapter names match the
                nn.Module path. (One adapter per graph: a second named adapter is refused.)
Preconditions:  the graph module was captured before decompositions; targets come from `find_attention` on it.
Invariants:     all or nothing (the original graph and submodules are restored on error); numerically equal to
                the nn.Module path for the same adapter weights.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import fx

from ..config import AdaMoLEConfig
from ..kernels import register
from ..model.columns import column_gather, combine_deltas
from ..model.modules import AdapterGroup, ExpertSet
from ..model.projection import ProjectionAdapters
from ..model.state import GRAPH_PREFIX as PREFIX
from ._fx import ParamNames, as_linear
from .targets import PassReport, Target


def site_drop_mask(site: ExpertSet, x: torch.Tensor) -> torch.Tensor | None:
    """Graph-node helper: the site's dropout keep-mask for x (None when not dropping)."""
    return site.drop_mask(x)


def site_wants_aux(site: ExpertSet) -> bool:
    """Graph-node helper: does this forward compute the site's aux loss (read at run time: the training mode)?"""
    return site.wants_aux()


def site_record(site: ExpertSet, scores: torch.Tensor, mask: torch.Tensor, x: torch.Tensor | None = None,
                aux: torch.Tensor | None = None) -> None:
    """Graph-node helper: record the site's aux loss (computed by the op) and expert statistics (x: the
    projection's input, whose leading shape says which tokens are padding)."""
    site.record(scores, mask, lead=None if x is None else x.shape[:-1], aux=aux)


class _Emitter:
    """Emits the nodes of one rewritten call, tagging each with the module and role."""

    def __init__(self, graph: fx.Graph, module: str) -> None:
        self.graph, self.module = graph, module

    def __call__(self, op: str, target, args, role: str | None = None) -> fx.Node:
        node = self.graph.create_node(op, target, args)
        node.meta["amole"] = {"module": self.module, "role": role}
        return node

    def site(self, path: str, site: ExpertSet, role: str, x2: fx.Node, base: fx.Node | None,
             x: fx.Node | None = None) -> fx.Node:
        def attr(_site: ExpertSet, name: str) -> fx.Node:
            return self("get_attr", f"{path}.{name}", (), role)

        site_node = self("get_attr", path, (), role)
        mask = self("call_function", site_drop_mask, (site_node, x2), role)
        with_aux = self("call_function", site_wants_aux, (site_node,), role)
        args = tuple(site.op_args(x2, mask, base, tensor=attr, with_aux=with_aux))  # parameters: get_attr nodes
        res = self("call_function", torch.ops.amole.adapter.default, args, role)
        out, scores, m, aux = (self("call_function", operator.getitem, (res, i), role) for i in (0, 1, 2, 5))
        self("call_function", site_record, (site_node, scores, m, x, aux), role)
        return out


def _rewrite_call(gm: fx.GraphModule, node: fx.Node, call, group: AdapterGroup, path: str, module: str):
    graph = gm.graph
    emit = _Emitter(graph, module)
    users = list(node.users)
    rows = _row_range(call)
    with graph.inserting_before(node.next):  # keeps the emitted nodes in order
        x2 = emit("call_method", "reshape", (call.input, (-1, group.in_features)))
        x2 = emit("call_method", "to", (x2, group.adapter_dtype))
        sites = [(role, group[role]) for role in group.roles]
        if group.fused_base() and rows is None:
            base = emit("call_method", "reshape", (node, (-1, group.out_features)))
            out = emit.site(f"{path}.{sites[0][0]}", sites[0][1], sites[0][0], x2, base, call.input)
            new = emit("call_method", "view_as", (out, node))
        else:
            gather, n_rest = "column_gather", group.n_unadapted
            if rows is not None:  # the call computes some of the parameter's output lines (W[a:b]): their roles
                sites, gather, n_rest = _part(group, sites, rows, call.module)
            deltas = [emit.site(f"{path}.{r}", s, r, x2, None, call.input) for r, s in sites]
            gather = emit("get_attr", f"{path}.{gather}", ()) if group._buffers.get(gather) is not None else None
            full = emit("call_function", combine_deltas, (deltas, gather, n_rest))
            full = emit("call_method", "type_as", (emit("call_method", "view_as", (full, node)), node))
            new = emit("call_function", operator.add, (node, full))
    for user in users:
        user.replace_input_with(node, new)


def _part(group: AdapterGroup, sites: list, rows: slice, module: str) -> tuple[list, str, int]:
    """The roles whose columns lie in `rows` (a call computing those output lines), and the gather placing
    their deltas in the call's columns (a buffer on the group) -> (sites, gather buffer path, unadapted count)."""
    part, cols = [], []
    for (role, site), columns in zip(sites, group.columns, strict=True):
        inside = [rows.start <= c < rows.stop for c in columns]
        if any(inside) and not all(inside):
            raise ValueError(f"{module}: role {role}'s columns straddle a call's slice of the weight")
        if all(inside):
            part.append((role, site))
            cols.append(tuple(c - rows.start for c in columns))
    device = next(group.parameters()).device
    gather, n_rest = column_gather(tuple(cols), rows.stop - rows.start, device)
    name = f"part_gather_{rows.start}_{rows.stop}"
    if name not in group._buffers:
        group.register_buffer(name, gather, persistent=False)
    return part, name, n_rest


def _row_range(call) -> slice | None:
    """The call's output lines of its parameter as a slice (None: all of them)."""
    if call.rows is None:
        return None
    lo = call.rows[0]
    if call.rows != tuple(range(lo, lo + len(call.rows))):
        raise ValueError(f"{call.module}: a call reads a strided selection of its output lines; the graph path "
                         "adapts whole parameters and contiguous slices only")
    return slice(lo, lo + len(call.rows))


def _weight(gm: fx.GraphModule, unit: str) -> torch.Tensor:
    """A target's weight: the unit itself (a bare parameter) or its module's `weight`."""
    try:
        return gm.get_parameter(unit)
    except AttributeError:
        return gm.get_parameter(f"{unit}.weight")


NAME = "default"  # the one adapter of a rewritten graph


def insert_ops(gm: fx.GraphModule, targets: list[Target], config: AdaMoLEConfig,
               name: str = NAME) -> tuple[PassReport, fx.Graph]:
    """Run the pass on gm in place (all or nothing) -> (how many calls it rewrote, the graph as it was, which
    `remove_ops` takes back)."""
    if name != NAME or hasattr(gm, PREFIX):
        raise ValueError("a GraphModule holds one adapter, named 'default' (its op nodes are baked into the graph): "
                         "transform the nn.Module instead for named adapters, or untransform the graph first")
    register()  # the nodes call torch.ops.amole.adapter
    report = PassReport("insert_ops", targets=list(targets))
    params = ParamNames(gm)
    calls = [(n, as_linear(n, params)) for n in gm.graph.nodes]
    by_module = {t.module: t for t in targets}
    saved = copy.deepcopy(gm.graph)
    try:
        for t in targets:
            weight = _weight(gm, t.module)
            dtype = getattr(torch, config.adapter_dtype) if config.adapter_dtype else weight.dtype
            group = AdapterGroup(t.in_features, t.out_features, t.roles, tuple(t.columns(r) for r in t.roles),
                                 config, dtype if dtype.is_floating_point else torch.float32, weight.device)
            holder = ProjectionAdapters(t.in_features, t.out_features).train(gm.training)
            holder.add(NAME, group)
            holder.active = NAME
            gm.add_submodule(f"{PREFIX}.{t.module}", holder)
        for node, call in calls:
            if call is not None and call.module in by_module:
                path = f"{PREFIX}.{call.module}.adapters.{NAME}"
                _rewrite_call(gm, node, call, gm.get_submodule(path), path, call.module)
                report.rewritten += 1
        gm.graph.lint()
        gm.recompile()
    except Exception:
        _restore(gm, saved)
        raise
    return report, saved


def _restore(gm: fx.GraphModule, graph: fx.Graph) -> None:
    gm.graph = graph
    if hasattr(gm, PREFIX):
        delattr(gm, PREFIX)
    gm.recompile()


def remove_ops(gm: fx.GraphModule, original: fx.Graph) -> None:
    """Undo `insert_ops`: restore the graph it was given (`original`) and drop the adapters."""
    _restore(gm, original)
