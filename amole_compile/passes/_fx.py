"""FX helpers shared by the passes: op names that work on aten and torch-level graphs, linear-like producers,
and parameter names for placeholders (ExportedProgram) and get_attr nodes (GraphModule)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import fx, nn

# Ops that only move or select elements: replaying them on an index tensor says which columns land where.
SHAPE_OPS = frozenset({
    "view", "reshape", "_unsafe_view", "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice",
    "select", "split", "split_with_sizes", "tensor_split", "chunk", "unbind", "contiguous", "clone", "alias",
    "flatten", "unflatten", "narrow", "t", "movedim", "swapaxes", "getitem", "expand_as", "view_as",
    "reshape_as", "detach",
})
# Dtype casts: identity on the index tensor.
CAST_OPS = frozenset({"to", "_to_copy", "type_as", "float", "half", "bfloat16", "type", "_assert_tensor_metadata"})
# Per-token arithmetic between a projection and attention: rotary, scaling, repeat_kv, q/k norms.
ARITH_OPS = frozenset({
    "mul", "add", "sub", "div", "neg", "cat", "concat", "concatenate", "stack", "repeat", "repeat_interleave",
    "layer_norm", "rms_norm", "truediv", "iadd", "imul",
})
NORM_OPS = frozenset({"layer_norm", "rms_norm"})  # walk only their input, not their weights
# What sits between attention scores and softmax, and between softmax and the value matmul.
SCORE_OPS = frozenset({"add", "mul", "div", "sub", "where", "masked_fill", "tanh", "clamp", "truediv"}) | CAST_OPS
PROB_OPS = frozenset({"dropout", "native_dropout", "getitem", "feature_dropout"}) | CAST_OPS
OUT_OPS = SHAPE_OPS | CAST_OPS | frozenset({"dropout"})
SOFTMAX_OPS = frozenset({"softmax", "_softmax", "_safe_softmax"})
MATMUL_OPS = frozenset({"matmul", "bmm"})
SDPA_OPS = frozenset({"scaled_dot_product_attention"})


def op_name(node: fx.Node) -> str:
    """A canonical op name: 'view' for aten.view.default, torch.Tensor.view, a call_method 'view' alike."""
    t = node.target
    if node.op == "call_method":
        return str(t)
    if node.op != "call_function":
        return ""
    packet = getattr(t, "_overloadpacket", None)
    name = getattr(packet, "__name__", None) or getattr(t, "__name__", "")
    return name.strip("_") if name.startswith("__") else name


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """Node arguments (flattening lists, e.g. cat's) in order."""
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n))
    return out


@dataclasses.dataclass(frozen=True)
class LinearCall:
    """A linear-like node: its input node, its weight's parameter name, the owning module name and
    (in_features, out_features) when the weight's shape is known."""

    node: fx.Node
    input: fx.Node
    param: str
    module: str
    features: tuple[int, int] | None = None


class ParamNames:
    """Maps weight nodes to parameter names: ExportedProgram placeholders or GraphModule get_attr targets."""

    def __init__(self, graph_module: nn.Module | None, placeholder_params: dict[str, str] | None = None):
        self.gm = graph_module
        self.placeholders = placeholder_params or {}

    def __call__(self, node: object) -> str | None:
        if not isinstance(node, fx.Node):
            return None
        if node.op == "placeholder":
            return self.placeholders.get(node.name)
        if node.op == "get_attr":
            return str(node.target)
        return None

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        """The shape of a parameter node: its example value (ExportedProgram) or the GraphModule's tensor."""
        val = meta_value(node)
        if isinstance(val, torch.Tensor):
            return tuple(int(s) for s in val.shape)
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


def as_linear(node: fx.Node, params: ParamNames) -> LinearCall | None:
    """linear(x, W[, b]) / addmm(b, x, W) (GPT-2 Conv1D) / call_module(Linear|Conv1D) -> LinearCall, else None."""
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
    if name == "linear" and len(node.args) >= 2:
        x, w, transposed = node.args[0], node.args[1], False  # W [O, D]
    elif name == "addmm" and len(node.args) >= 3:
        x, w, transposed = node.args[1], node.args[2], True  # Conv1D: W [D, O]
    else:
        return None
    pname = params(w)
    if pname is None or not isinstance(x, fx.Node) or not pname.endswith(".weight"):
        return None
    shape = params.shape(w)
    feats = None if shape is None or len(shape) != 2 else (shape if transposed else shape[::-1])
    return LinearCall(node, x, pname, pname[: -len(".weight")], feats)


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
    """A node's example value (FakeTensor / SymInt made concrete) or the literal itself."""
    if not isinstance(node, fx.Node):
        return node
    val = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(val, torch.SymInt):
        return int(val)
    return val
