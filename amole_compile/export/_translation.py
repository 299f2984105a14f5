"""ONNX translations of `torch.ops.amole.adapter.default` for `torch.onnx.export(dynamo=True)`.

Traced onnxscript functions handed to the exporter through `custom_translation_table`. They compute the
routing per token at run time, in the graph: nothing about which experts fire is baked in.

Legend: T tokens, D input dims, O output dims, E experts, R rank per expert, K = E * R,
Er router rows (`MethodSpec.router_rows`: E + 1 for adamole, E for mole, 0 for lora).

dense (default)   z = x [A; Wg; wt]^T + [0..0, bt]   one Gemm reads x once                 [T, K + Er]
                  (float16 / bfloat16 x: z = x A^T, and the router logits x [Wg; wt]^T in float32, apart)
                  w = route(z[:, K:])                softmax / threshold / >= / renorm     [T, E]
                  sw = w P                           P [E, K + Er]: s on expert e's columns [T, K + Er]
                  out = base + (z * sw) [B | 0]^T    one Gemm (the op's addmm)             [T, O]
skip              routing as above from x [Wg; wt]^T, then per expert an ONNX `If` on "some token of the
                  batch selected e": then-branch adds s * w_e * (x A_e^T) B_e^T to the running sum, the
                  else-branch passes it through, so experts nobody selected cost nothing.

Routing (float32, float64 for float64 inputs), as `kernels/routing_torch.route`, keyed by `MethodSpec.code`:
adamole  p = softmax(l), tau = cap * sigmoid(u + b), a = p - tau, m = a >= 0, w = a m / S (S == 0 -> 1)
mole     p = softmax(l), m = top-k(l), w = p m / sum(p m)
lora     w = 1
"""

from __future__ import annotations

import itertools
from typing import TypeVar, Union

import numpy as np
import onnx_ir as ir
from onnxscript import opset18 as op
from onnxscript.onnx_types import BFLOAT16, BOOL, DOUBLE, FLOAT, FLOAT16

from ..kernels.methods import ADAMOLE, MOLE, method_spec
from ..kernels.op import AdapterArgs
from ._moe import moe_translations

_Float = Union[FLOAT, FLOAT16, BFLOAT16, DOUBLE]  # noqa: UP007 (onnxscript reads the annotation)
TX = TypeVar("TX", bound=_Float)  # x and the adapter's parameters
TBase = TypeVar("TBase", bound=_Float)  # the frozen projection's output (may differ: adapter_dtype)
TMask = TypeVar("TMask", bound=BOOL)
MASKING = ("dense", "skip")
_names = itertools.count()


# ---- small helpers --------------------------------------------------------------------------------

def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def _scalar(value: float, dtype: ir.DataType):
    return op.Constant(value=ir.tensor([value], dtype=dtype))


def _cols(t, start: int, stop: int):
    """t[:, start:stop]"""
    return op.Slice(t, _ints(start), _ints(stop), _ints(1))


def _rows(t, start: int, stop: int):
    """t[start:stop, :]"""
    return op.Slice(t, _ints(start), _ints(stop), _ints(0))


def _route_dtype(dtype: ir.DataType) -> ir.DataType:
    return ir.DataType.DOUBLE if dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT


def _cast(t, src: ir.DataType, dst: ir.DataType):
    """t (of dtype src; traced values do not always carry their dtype) -> dtype dst."""
    return t if src == dst else op.Cast(t, to=dst)


# ---- routing ----------------------------------------------------------------------------------------

def _normalise(num, dtype):
    """num [T, E] >= 0 -> num / S with S = sum(num) and S == 0 -> 1."""
    s = op.ReduceSum(num, _ints(-1), keepdims=1)  # [T, 1]
    s = op.Where(op.Equal(s, _scalar(0.0, dtype)), _scalar(1.0, dtype), s)
    return op.Div(num, s)


def _route_adamole(logits, u, dt: ir.DataType, num_experts: int, cap: float):
    """logits [T, E], u [T, 1] (threshold logit, bias included) -> (w, a, m)."""
    p = op.Softmax(logits, axis=-1)
    a = op.Sub(p, op.Mul(_scalar(cap, dt), op.Sigmoid(u)))  # a = p - tau, tau = cap * sigmoid(u)
    m = op.GreaterOrEqual(a, _scalar(0.0, dt))  # >= : an expert exactly at the threshold is selected
    return _normalise(op.Relu(a), dt), a, m  # Relu(a) == a * 1[a >= 0], bit for bit


def _route_mole(logits, dt: ir.DataType, top_k: int):
    """logits [T, E] -> (w, p, m) with m the top-k of the logits."""
    p = op.Softmax(logits, axis=-1)
    _, idx = op.TopK(logits, _ints(top_k), axis=-1, largest=1, sorted=1)  # [T, k]
    ones, zeros = op.Expand(_scalar(1.0, dt), op.Shape(idx)), op.Expand(_scalar(0.0, dt), op.Shape(p))
    m = op.Cast(op.ScatterElements(zeros, idx, ones, axis=-1), to=ir.DataType.BOOL)
    return _normalise(op.Mul(p, op.Cast(m, to=dt)), dt), p, m


def route(z, x_dtype: ir.DataType, start: int, thr_b, bias_in_z: bool, method: str, num_experts: int,
          top_k: int, cap: float):
    """Router logits at columns start.. of z [T, *], in the routing dtype (`router_logits`) -> (w [T, E],
    scores [T, E], mask [T, E] bool). `bias_in_z`: the threshold bias was already added to z's threshold
    column."""
    rt, e, code = _route_dtype(x_dtype), num_experts, method_spec(method).code
    logits = _cols(z, start, start + e)
    if code == MOLE.code:
        return _route_mole(logits, rt, top_k)
    if code != ADAMOLE.code:
        raise NotImplementedError(f"no ONNX routing for method {method!r}")
    u = _cols(z, start + e, start + e + 1)
    if not bias_in_z:
        u = op.Add(u, _cast(thr_b, x_dtype, rt))
    return _route_adamole(logits, u, rt, e, cap)


def router_logits(x, router, x_dtype: ir.DataType):
    """x [T, D] [Wg; wt]^T -> [T, Er] computed in the routing dtype (float32 for half inputs: a float16 logit
    overflows, as the op's torch path and kernels avoid)."""
    rt = _route_dtype(x_dtype)
    return op.MatMul(_cast(x, x_dtype, rt), _t(_cast(router, x_dtype, rt)))


# ---- the dense translation ----------------------------------------------------------------------

def _router(gate_w, thr_w):
    """-> ([Wg; wt] [Er, D], Er) or (None, 0)."""
    parts = [t for t in (gate_w, thr_w) if t is not None]
    if not parts:
        return None, 0
    rows = sum(t.shape[0] for t in parts)
    return (parts[0] if len(parts) == 1 else op.Concat(*parts, axis=0)), rows


def _t(w):
    return op.Transpose(w, perm=[1, 0])


def _dropped(x, drop_mask, drop_scale: float):
    return op.Mul(op.Mul(x, op.Cast(drop_mask, to=x.dtype)), _scalar(drop_scale, x.dtype))


def thr_b_column(thr_b, zeros: int, dtype: ir.DataType):
    """[zeros + 1] bias for a Gemm whose last output column is the threshold logit: 0 elsewhere, then b."""
    return op.Concat(op.Expand(_scalar(0.0, dtype), _ints(zeros)), thr_b, axis=0)


def _expand_weights(num_experts: int, rank: int, width: int, scale: float, dtype: ir.DataType):
    """[E, width] constant: scale in expert e's R columns, 0 elsewhere; w @ it == scale * w per column, exactly
    (one product per entry, the rest adds zeros)."""
    sp = np.zeros((num_experts, width), dtype=ir.DataType(dtype).numpy())
    for e in range(num_experts):
        sp[e, e * rank:(e + 1) * rank] = scale
    return op.Constant(value=ir.tensor(sp))


def _up(h, lora_b, base, dtype: ir.DataType, alpha: float = 1.0):
    """h [T, W] (of dtype, the adapter's) -> base + alpha h B^T (Gemm = the op's addmm when dtypes agree)."""
    if base is None:
        return op.Gemm(h, lora_b, transB=1, alpha=alpha)
    if base.dtype == dtype:
        return op.Gemm(h, lora_b, base, transB=1, alpha=alpha)
    return op.Add(base, op.Cast(op.Gemm(h, lora_b, transB=1, alpha=alpha), to=base.dtype))


def _lora(x, xd, lora_a, lora_b, base, scale: float):
    """Plain LoRA: out = base + s (x A^T) B^T; scores / mask are ones [T, 1], zr is [T, 0]."""
    za = op.MatMul(xd, _t(lora_a))
    out = _up(za, lora_b, base, x.dtype, alpha=scale)
    rt, rows = _route_dtype(x.dtype), op.Shape(x, start=0, end=1)
    ones = op.Expand(_scalar(1.0, rt), op.Concat(rows, _ints(1), axis=0))
    zr = op.Expand(_scalar(0.0, rt), op.Concat(rows, _ints(0), axis=0))
    return out, ones, op.Cast(ones, to=ir.DataType.BOOL), za, zr


def _dense(a: AdapterArgs):
    """amole::adapter, dense: every expert computed, unselected ones weighted 0 (see module doc).

    Without dropout one Gemm gives z = [x A^T | gate logits | threshold logit (+ bias)]; the router columns of
    z are zeroed by the weights and meet zero columns of [B | 0], so z feeds the up-projection directly.
    """
    x, drop_mask, lora_a, lora_b = a.x, a.drop_mask, a.lora_a, a.lora_b
    xd = x if drop_mask is None else _dropped(x, drop_mask, a.drop_scale)
    spec = method_spec(a.method)
    if not spec.has_gate:
        return _lora(x, xd, lora_a, lora_b, a.base, a.scale)
    router, er = _router(a.gate_w, a.thr_w)
    rt, k, e = _route_dtype(x.dtype), lora_a.shape[0], a.num_experts
    o = lora_b.shape[0]
    one_gemm = drop_mask is None and rt == x.dtype  # half dtypes: the router apart, in float32
    fold = spec.has_threshold and one_gemm  # threshold bias into the Gemm
    if one_gemm:
        g = op.Concat(lora_a, router, axis=0)  # [K + Er, D]
        bias = thr_b_column(a.thr_b, k + e, x.dtype) if fold else None
        z = op.Gemm(x, g, bias, transB=1) if fold else op.MatMul(x, _t(g))  # [T, K + Er]
        zs, start, up_b = z, k, op.Concat(lora_b, op.Expand(_scalar(0.0, x.dtype), _ints(o, er)), axis=1)
        za = _cols(z, 0, k)
    else:
        zs, start, up_b = router_logits(x, router, x.dtype), 0, lora_b
        z = za = op.MatMul(xd, _t(lora_a))  # [T, K]
    w, scores, m = route(zs, x.dtype, start, a.thr_b, fold, a.method, e, a.top_k, a.max_threshold)
    width = k + er if one_gemm else k
    sw = _cast(op.MatMul(w, _expand_weights(e, k // e, width, a.scale, rt)), rt, x.dtype)  # [T, width]
    out = _up(op.Mul(z, sw), up_b, a.base, x.dtype)  # [T, O]
    zr = router_logits(x, router, x.dtype)  # the op's zr output (pruned when unused)
    return out, scores, m, za, zr


# ---- the skip translation --------------------------------------------------------------------------

def _node(nodes: list, op_type: str, inputs: list, tag: str, **attrs) -> ir.Value:
    """Append a named node of a subgraph (values from the outer graph may be used directly)."""
    n = ir.Node("", op_type, inputs, attributes=ir.convenience.convert_attributes(attrs), num_outputs=1,
                name=f"{tag}_{op_type}")
    n.outputs[0].name = f"{tag}_{op_type}_out"
    nodes.append(n)
    return n.outputs[0]


def _expert_branches(acc, xd, a_t, b_e, sw_e, tag: str) -> tuple[ir.Graph, ir.Graph]:
    """then: acc + ((x A_e^T) * sw_e) B_e^T; else: acc."""
    nodes: list = []
    za = _node(nodes, "MatMul", [xd, a_t], tag)
    h = _node(nodes, "Mul", [za, sw_e], tag)
    y = _node(nodes, "Gemm", [h, b_e, acc], tag, transB=1)
    then = ir.Graph((), [y], nodes=nodes, name=f"{tag}_then")
    keep: list = []
    other = ir.Graph((), [_node(keep, "Identity", [acc], f"{tag}_skip")], nodes=keep, name=f"{tag}_else")
    return then, other


def _skip(a: AdapterArgs):
    """amole::adapter with each expert behind an `If` that skips it when no token of the batch selected it.

    LoRA has a single always-on expert and falls back to the dense translation.
    """
    spec = method_spec(a.method)
    if not spec.has_gate:
        return _dense(a)
    x, lora_a, lora_b, base = a.x, a.lora_a, a.lora_b, a.base
    rt, e, k = _route_dtype(x.dtype), a.num_experts, lora_a.shape[0]
    r, router = k // e, _router(a.gate_w, a.thr_w)[0]
    fold = spec.has_threshold and rt == x.dtype
    zr = op.Gemm(x, router, thr_b_column(a.thr_b, e, x.dtype), transB=1) if fold else \
        router_logits(x, router, x.dtype)
    w, scores, m = route(zr, x.dtype, 0, a.thr_b, fold, a.method, e, a.top_k, a.max_threshold)
    xd = x if a.drop_mask is None else _dropped(x, a.drop_mask, a.drop_scale)
    sw = _cast(op.Mul(_scalar(a.scale, rt), w), rt, x.dtype)  # [T, E]
    used = op.Greater(op.ReduceMax(op.Cast(m, to=ir.DataType.FLOAT), _ints(0), keepdims=0),
                      _scalar(0.0, ir.DataType.FLOAT))  # [E] bool: some token of the batch selected expert e
    same = base is not None and base.dtype == x.dtype
    acc = base if same else op.Expand(_scalar(0.0, x.dtype),
                                      op.Concat(op.Shape(x, start=0, end=1), _ints(lora_b.shape[0]), axis=0))
    run = next(_names)
    for i in range(e):
        then, other = _expert_branches(acc, xd, _t(_rows(lora_a, i * r, (i + 1) * r)),
                                       _cols(lora_b, i * r, (i + 1) * r), _cols(sw, i, i + 1), f"amole_skip{run}_e{i}")
        acc = op.If(op.Gather(used, op.Constant(value_int=i), axis=0), then_branch=then, else_branch=other)
    out = acc if same or base is None else op.Add(base, _cast(acc, x.dtype, base.dtype))
    za = op.MatMul(xd, _t(lora_a))  # the op's za / zr outputs (pruned when unused)
    return out, scores, m, za, router_logits(x, router, x.dtype)


# ---- the translations the exporter calls ----------------------------------------------------------------

def _no_aux(x):
    """The op's aux outputs when the aux loss is not computed (every inference forward): two empty tensors."""
    empty = op.Constant(value=ir.tensor(np.zeros((0,), dtype=_route_dtype(x.dtype).numpy())))
    return empty, op.Identity(empty)


def _translation(body, name: str):
    """`body(AdapterArgs)` as a translation of amole::adapter. The exporter matches the node's arguments on the
    translation's explicit, annotated parameters (typing.get_type_hints, inspect.signature), so they are written
    out here, once, in the schema's order (`AdapterArgs`' fields)."""

    def translation(
        x: TX, drop_mask: TMask | None, lora_a: TX, lora_b: TX, gate_w: TX | None, thr_w: TX | None,
        thr_b: TX | None, base: TBase | None, method: str, num_experts: int, top_k: int, scale: float,
        max_threshold: float, drop_scale: float, kernels: str, with_aux: bool = False,
    ):
        if with_aux:
            raise ValueError("amole::adapter with with_aux=True (a training-mode forward) has no ONNX translation: "
                             "export the model in eval mode")
        a = AdapterArgs(x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, base, method, num_experts, top_k,
                        scale, max_threshold, drop_scale, kernels)
        return (*body(a), *_no_aux(x))

    translation.__name__ = translation.__qualname__ = name
    translation.__doc__ = body.__doc__
    return translation


adapter_dense = _translation(_dense, "adapter_dense")
adapter_skip = _translation(_skip, "adapter_skip")


def translation_table(masking: str = "dense") -> dict:
    """The `custom_translation_table` for torch.onnx.export: {amole::adapter: translation}, and the base's MoE
    grouped matmul where transformers registered it (`_moe.py`)."""
    import torch

    from ..kernels import register

    register()  # torch.ops.amole.adapter

    if masking not in MASKING:
        raise ValueError(f"masking must be one of {MASKING}, got {masking!r}")
    fn = adapter_dense if masking == "dense" else adapter_skip
    return {torch.ops.amole.adapter.default: fn, **moe_translations()}
