"""FX helpers shared by the passes: op names that work on aten and torch-level graphs, data edges (which
arguments carry data, which only metadata; in-place writes), projections recognised by what they compute, and
parameter names for placeholders (ExportedProgram) and get_attr nodes (GraphModule)."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable

import torch
from torch import fx, nn

SOFTMAX_OPS = frozenset({"softmax", "_softmax", "_safe_softmax", "log_softmax"})
# Products of two activations: attention scores (q kᵀ) and the value product (p v).
MATMUL_OPS = frozenset({"matmul", "bmm", "einsum", "baddbmm", "mm"})
SDPA_OPS = frozenset({"scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
                      "_scaled_dot_product_efficient_attention", "_scaled_dot_product_attention_math",
                      "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                      "flex_attention"})  # (q, k, v, ...) first; the fused kernels and flex return (out, lse, ...)
# Arguments that carry only metadata (dtype, shape, device), by op and position: not data edges.
META_ARGS = {
    "type_as": {1}, "expand_as": {1}, "view_as": {1}, "reshape_as": {1}, "to": {1},
    "new_empty": {0}, "new_zeros": {0}, "new_ones": {0}, "new_full": {0}, "new_empty_strided": {0},
    "empty_like": {0}, "zeros_like": {0}, "ones_like": {0}, "full_like": {0}, "rand_like": {0},
    "randn_like": {0}, "randint_like": {0}, "_assert_tensor_metadata": {0}, "sym_size": {0}, "size": {0},
    "sym_numel": {0}, "sym_stride": {0}, "dim": {0},
}
# Transposes: a projection may read its weight through one of these (`x @ W.T`).
TRANSPOSES = frozenset({"t", "transpose", "permute", "numpy_T", "T", "mT", "swapaxes", "movedim"})
PROJECTION_OPS = frozenset({"linear", "addmm", "mm", "matmul", "bmm"})


def op_name(node: fx.Node) -> str:
    """A canonical op name: 'view' for aten.view.default, torch.Tensor.view, a call_method 'view' alike."""
    t = node.target
    if node.op == "call_method":
        return str(t)
    if node.op != "call_function":
        return ""
    if t is operator.getitem:
        return "getitem"
    packet = getattr(t, "_overloadpacket", None)
    name = getattr(packet, "__name__", None) or getattr(t, "__name__", "")
    return name.strip("_") if name.startswith("__") else name


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """Node arguments (flattening lists, e.g. cat's) in order."""
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n))
    return out


def _schema(node: fx.Node):
    return getattr(node.target, "_schema", None) if node.op == "call_function" else None


def is_inplace(node: fx.Node) -> bool:
    """Does the node write its first argument in place (`copy_`, `clamp_`, `index_put_`, ...)?"""
    schema = _schema(node)
    if schema is not None:
        args = schema.arguments
        return bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write
    name = op_name(node)
    return name.endswith("_") and not name.startswith("_") and node.op in ("call_method", "call_function")


def is_view(node: fx.Node) -> bool:
    """Does the node return a view of its first argument (slice, view, transpose, ...), not written in place?"""
    schema = _schema(node)
    if schema is None or not schema.returns or is_inplace(node):
        return False
    alias = schema.returns[0].alias_info
    return alias is not None and not alias.is_write


def _is_data(arg: fx.Node) -> bool:
    val = meta_value(arg)
    return val is None or isinstance(val, (torch.Tensor, list, tuple))


def data_args(node: fx.Node) -> list[fx.Node]:
    """The arguments whose values flow into the node's output: tensor arguments minus metadata-only ones
    (`type_as`'s second argument, `new_empty`'s template, sizes)."""
    skip = META_ARGS.get(op_name(node), ())
    out: list[fx.Node] = []
    for i, a in enumerate(node.args):
        if i in skip:
            continue
        fx.node.map_arg(a, out.append)
    fx.node.map_arg(node.kwargs, out.append)
    return [a for a in out if _is_data(a)]


class DataFlow:
    """Data edges of a graph, in-place writes included: a write into a view of a buffer is an edge from the
    written value into the buffer (MLA's `k = q.new_empty(...); k[..., :n].copy_(k_nope)`)."""

    def __init__(self, graph: fx.Graph) -> None:
        self.root: dict[fx.Node, fx.Node] = {}
        self.writes: dict[fx.Node, list[fx.Node]] = {}
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        for n in graph.nodes:
            if n.op not in ("call_function", "call_method"):
                continue
            first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
            if first is None:
                continue
            if is_view(n) or is_inplace(n):
                self.root[n] = self.root_of(first)
            if is_inplace(n):
                self.writes.setdefault(self.root_of(first), []).append(n)

    def root_of(self, node: fx.Node) -> fx.Node:
        return self.root.get(node, node)

    def inputs(self, node: fx.Node) -> list[fx.Node]:
        """Data predecessors: the data arguments, plus every in-place write into the buffer the node reads."""
        return data_args(node) + [w for w in self.writes.get(self.root_of(node), []) if w is not node]


@dataclasses.dataclass(frozen=True)
class LinearCall:
    """A projection: a node computing `input @ Wᵀ` (+ bias) for a parameter matrix W, or for some of its output
    lines (`W[a:b]`, a `split` / `chunk` of W: fairseq's and nn.MultiheadAttention's cross-attention).

    param     the weight's parameter name
    module    the unit an adapter would adapt: the owning module when W is its `weight` (nn.Linear, Conv1D, any
              module holding its matrix as `weight`), else the parameter itself (a bare parameter: `self.wq`,
              `in_proj_weight`)
    features  (in_features, out_features) of the whole parameter, when its shape is known
    rows      the parameter's output lines this call computes, in the order of its output columns (None: all,
              in order)
    """

    node: fx.Node
    input: fx.Node
    param: str
    module: str
    features: tuple[int, int] | None = None
    rows: tuple[int, ...] | None = None

    @property
    def bare(self) -> bool:
        """Is the unit a parameter, not a module?"""
        return self.module == self.param

    @property
    def width(self) -> int:
        """How many output columns this call computes."""
        return len(self.rows) if self.rows is not None else self.features[1]

    def lines(self, cols=None) -> list[int]:
        """This call's output columns `cols` (default: all) -> the parameter's output lines they are."""
        cols = range(self.width) if cols is None else cols
        return [self.rows[c] for c in cols] if self.rows is not None else list(cols)


def unit_of(param: str) -> str:
    """The unit an adapter adapts for a weight parameter: its module when it is that module's `weight`, else
    the parameter (a bare parameter)."""
    owner, _, leaf = param.rpartition(".")
    return (owner or param) if leaf == "weight" else param


class ParamNames:
    """Maps weight nodes to parameter names: ExportedProgram placeholders or GraphModule get_attr targets."""

    def __init__(self, graph_module: nn.Module | None, placeholder_params: dict[str, str] | None = None,
                 constants: dict[str, torch.Tensor] | None = None):
        self.gm = graph_module
        self.placeholders = placeholder_params or {}
        self.constants = constants or {}  # placeholder name -> lifted tensor constant (Falcon's `[..., [-2]]`)

    @classmethod
    def of_export(cls, ep: torch.export.ExportedProgram) -> ParamNames:
        """The parameter names and lifted constants of an ExportedProgram's placeholders."""
        sig = ep.graph_signature
        consts = {ph: ep.constants[name] for ph, name in sig.inputs_to_lifted_tensor_constants.items()
                  if name in ep.constants}
        return cls(None, dict(sig.inputs_to_parameters), consts)

    def constant(self, node: fx.Node) -> torch.Tensor | None:
        """The real value of a constant tensor node (lifted constant, or a GraphModule attribute), else None."""
        if node.op == "placeholder":
            return self.constants.get(node.name)
        if node.op == "get_attr" and self.gm is not None and self(node) is None:
            val = getattr(self.gm, str(node.target), None)
            return val if isinstance(val, torch.Tensor) else None
        return None

    def __call__(self, node: object) -> str | None:
        if not isinstance(node, fx.Node):
            return None
        if node.op == "placeholder":
            return self.placeholders.get(node.name)
        if node.op == "get_attr":
            if self.gm is not None:
                try:
                    self.gm.get_parameter(str(node.target))
                except AttributeError:
                    return None
            return str(node.target)
        return None

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        """The shape of a parameter node: its example value (ExportedProgram) or the GraphModule's tensor."""
        val = meta_value(node)
        if isinstance(val, torch.Tensor):
            return concrete_shape(val)
        if node.op == "get_attr" and self.gm is not None:
            try:
                return tuple(self.gm.get_parameter(str(node.target)).shape)
            except AttributeError:
                return None
        return None

    def module_of(self, node: fx.Node) -> nn.Module | None:
        if self.gm is None or node.op != "call_module":
            return None
        return self.gm.get_submodule(str(node.target))


# Ops that select or move a weight's elements without arithmetic (besides views, recognised by their schema).
WEIGHT_MOVES = frozenset({"getitem", "split", "split_with_sizes", "chunk", "narrow", "contiguous", "clone"})
MAX_WEIGHT_CHAIN = 6


def _weight_chain(node: object, params: ParamNames) -> tuple[fx.Node, list[fx.Node]] | None:
    """A weight operand read from a 2-D parameter through element moves only -> (param node, the moves in
    order), else None."""
    chain: list[fx.Node] = []
    while isinstance(node, fx.Node) and params(node) is None:
        moves = is_view(node) or op_name(node) in WEIGHT_MOVES | TRANSPOSES
        if not moves or len(chain) >= MAX_WEIGHT_CHAIN or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        if any(isinstance(a, fx.Node) for a in tensor_args(node)[1:]):
            return None  # a size or index that is itself a graph value
        chain.append(node)
        node = node.args[0]
    if not isinstance(node, fx.Node):
        return None
    return node, chain[::-1]


def _replay_chain(index: torch.Tensor, chain: list[fx.Node]) -> torch.Tensor | None:
    """Run the weight's moves on `index` (a tensor of the parameter's shape holding each element's row, or
    column, index)."""
    val: object = index
    for node in chain:
        prev = node.args[0]
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n, prev=prev, val=val: val if n is prev else n)
        try:
            if node.op == "call_method":
                val = getattr(args[0], str(node.target))(*args[1:], **kwargs)
            elif node.target is operator.getitem:
                val = args[0][args[1]]
            else:
                val = node.target(*args, **kwargs)
        except Exception:
            return None
    return val if isinstance(val, torch.Tensor) and val.dim() == 2 else None


def _lines(rows: torch.Tensor, cols: torch.Tensor, width: int) -> tuple[int, ...] | None:
    """Indices along the parameter's output axis (`rows`) and input axis (`cols`) of an operand arranged
    [out, in] -> the output lines it reads, in order; None unless each output reads a whole input line."""
    if cols.shape[1] != width or not bool((cols == torch.arange(width)).all()):
        return None
    if not bool((rows == rows[:, :1]).all()):
        return None
    return tuple(int(r) for r in rows[:, 0])


def _weight(node: object, params: ParamNames, out_in: bool) -> tuple[fx.Node, tuple[int, int], tuple | None] | None:
    """A projection's weight operand (`out_in`: laid out [O, D] as linear's, else [D, O] as mm's) -> (the
    parameter node, (in, out) features of the whole parameter, its output lines this call uses or None for
    all in order). Moves between the parameter and the operand are replayed on index tensors (stride-0
    views: nothing of the parameter's size is allocated)."""
    found = _weight_chain(node, params)
    if found is None:
        return None
    wnode, chain = found
    shape = params.shape(wnode)
    if shape is None:
        return (wnode, None, None) if not chain else None
    if len(shape) != 2:
        return None
    if not chain:
        return wnode, (shape[1], shape[0]) if out_in else (shape[0], shape[1]), None
    axes = [_replay_chain(torch.arange(n).view(*(-1 if a == i else 1 for a in range(2))).expand(shape), chain)
            for i, n in enumerate(shape)]  # each element's index along the parameter's axis 0, axis 1
    if any(a is None for a in axes):
        return None
    axes = axes if out_in else [a.t() for a in axes]  # arranged [out, in]
    for out_axis in (0, 1):  # outputs along the parameter's first axis (linear's [O, D]) or second (Conv1D's)
        lines = _lines(axes[out_axis], axes[1 - out_axis], shape[1 - out_axis])
        if lines is not None:
            feats = (shape[1], shape[0]) if out_axis == 0 else (shape[0], shape[1])
            return wnode, feats, lines if lines != tuple(range(feats[1])) else None
    return None


def as_linear(node: fx.Node, params: ParamNames) -> LinearCall | None:
    """A node whose output is its input times a parameter matrix -> LinearCall, else None.

    linear(x, W[, b]); addmm(b, x, W) (GPT-2 Conv1D, W [D, O]) or addmm(b, x, Wᵀ); mm / matmul / bmm(x, W)
    with W a 2-D parameter read directly ([D, O]) or through t / transpose / permute / .T ([O, D]); W may be a
    selection of its output lines (`W[a:b]`, `W.split(...)[i]`, `W.chunk(3)[i]`: `rows`). A call to an
    nn.Linear or Conv1D module. The unit is the parameter's owner when W is its `weight`, else W (`unit_of`).
    """
    name = op_name(node)
    if node.op == "call_module":
        mod = params.module_of(node)
        if isinstance(mod, nn.Linear):
            feats = (mod.in_features, mod.out_features)
        elif mod is not None and type(mod).__name__ == "Conv1D":
            feats = tuple(int(s) for s in mod.weight.shape)  # Conv1D: W [D, O]
        else:
            return None
        return LinearCall(node, node.args[0], f"{node.target}.weight", str(node.target), feats)
    if name not in PROJECTION_OPS:
        return None
    if name == "linear" and len(node.args) >= 2:
        x, operand, out_in = node.args[0], node.args[1], True  # W [O, D]
    elif name == "addmm" and len(node.args) >= 3:
        x, operand, out_in = node.args[1], node.args[2], False
    elif name in ("mm", "matmul", "bmm") and len(node.args) >= 2:
        x, operand, out_in = node.args[0], node.args[1], False
    else:
        return None
    w = _weight(operand, params, out_in) if isinstance(x, fx.Node) else None
    if w is None:
        return None
    wnode, feats, rows = w
    pname = params(wnode)
    return LinearCall(node, x, pname, unit_of(pname), feats, rows)


def walk(start: fx.Node, step: Callable[[fx.Node], list[fx.Node]], stop: Callable[[fx.Node], bool]):
    """Breadth-first from start along step(); returns (stopped nodes in visit order, every node visited)."""
    seen, hits, frontier = {start}, [], [start]
    while frontier:
        nxt = []
        for n in frontier:
            if n is not start and stop(n):
                hits.append(n)
                continue
            for m in step(n):
                if m not in seen:
                    seen.add(m)
                    nxt.append(m)
        frontier = nxt
    return hits, seen


def meta_value(node: object) -> object:
    """A node's example value (FakeTensor / SymInt made concrete) or the literal itself. A SymInt that depends
    on values (unbacked: an MoE's count of routed tokens) has no concrete value and stays a SymInt."""
    if not isinstance(node, fx.Node):
        return node
    val = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(val, torch.SymInt):
        n = concrete_int(val)
        return val if n is None else n
    return val


def concrete_int(v: int | torch.SymInt) -> int | None:
    """An int, or a SymInt's example value; None where it depends on values (no hint to read)."""
    try:
        return int(v)
    except RuntimeError:  # GuardOnDataDependentSymNode, whose class torch keeps private
        return None


def concrete_shape(val: object) -> tuple[int, ...] | None:
    """A tensor value's (a FakeTensor's) shape as ints; None for a non-tensor or a size that depends on values
    (the capture left it symbolic, unbacked: reading it as an int would raise from inside torch)."""
    if not isinstance(val, torch.Tensor):
        return None
    dims = tuple(concrete_int(s) for s in val.shape)
    return None if None in dims else dims


class GraphView:
    """A graph with its data edges (`DataFlow`) and its projections (`as_linear`, memoised): what the discovery
    passes walk. Built once per graph and shared by `find_attention` and `find_mlp`."""

    def __init__(self, graph: fx.Graph, params: ParamNames) -> None:
        self.graph, self.params = graph, params
        self.flow = DataFlow(graph)
        self._proj: dict[fx.Node, LinearCall | None] = {}
        self.memo: dict[str, object] = {}  # what the passes sharing this view derive once (`_routing.router_calls`)

    def projection(self, node: fx.Node) -> LinearCall | None:
        """The projection `node` computes (None if it is not one)."""
        if node not in self._proj:
            self._proj[node] = as_linear(node, self.params)
        return self._proj[node]

    def users(self, node: fx.Node) -> list[fx.Node]:
        """Data successors: users reading `node` as data, and readers of a buffer written in place."""
        out = [u for u in node.users if node in data_args(u)]
        if is_inplace(node):
            root = self.flow.root_of(node)
            out += [u for u in root.users if u is not node and self.flow.order[u] > self.flow.order[node]]
        return out

    def first_call(self) -> dict[str, int]:
        """Module name -> the graph position of its first projection call."""
        first: dict[str, int] = {}
        for n in self.graph.nodes:
            call = self.projection(n)
            if call is not None:
                first.setdefault(call.module, self.flow.order[n])
        return first
