"""ONNX translation of the grouped matmul that transformers' MoE experts run on (`transformers::grouped_mm_fallback`,
its custom op for `torch.nn.functional.grouped_mm` where that is unavailable, as on CPU). Without one, no model with
such experts (Mixtral, OLMoE, Qwen3-MoE, ...) exported to ONNX, adapted or not: the exporter has no function for it.

Legend: S rows (routed token slots, sorted by expert), D in features, O out features, E experts.

    e(s) = #{i : offs[i] <= s}                   the expert of row s (offs: cumulative rows per expert)  [S]
    P    = input @ weight                        every expert's product of every row                     [E, S, O]
    out  = P[e(s), s, :]                         each row's own expert's                                 [S, O]

Every expert multiplies every row: E times the FLOPs of the routed product and an [E, S, O] intermediate, the
price of a graph with no data-dependent loop (a decoding step's few rows cost little). Numbers equal the op's:
the same matmul per row.
"""

from __future__ import annotations

from typing import TypeVar, Union

from onnxscript import opset18 as op
from onnxscript.onnx_types import BFLOAT16, DOUBLE, FLOAT, FLOAT16, INT32, INT64

TX = TypeVar("TX", bound=Union[FLOAT, FLOAT16, BFLOAT16, DOUBLE])  # noqa: UP007 (onnxscript reads the annotation)
TI = TypeVar("TI", bound=Union[INT32, INT64])  # noqa: UP007


def grouped_mm(input: TX, weight: TX, offs: TI):  # (the op's own argument names)
    """input [S, D] sorted by expert, weight [E, D, O], offs [E] cumulative row counts -> [S, O]."""
    s = op.Shape(input, start=0, end=1)  # [1]
    rows = op.Range(op.Constant(value_int=0), op.Squeeze(s), op.Constant(value_int=1))  # [S]
    ends = op.Cast(offs, to=INT64.dtype)  # [E]
    past = op.Cast(op.GreaterOrEqual(op.Unsqueeze(rows, [1]), op.Unsqueeze(ends, [0])), to=INT64.dtype)  # [S, E]
    last = op.Sub(op.Squeeze(op.Shape(weight, start=0, end=1)), op.Constant(value_int=1))
    expert = op.Min(op.ReduceSum(past, [1], keepdims=0), last)  # [S]: rows past offs[-1] (none) keep the last
    every = op.MatMul(op.Unsqueeze(input, [0]), weight)  # [E, S, O]
    shape = op.Concat(op.Constant(value_ints=[1]), s, op.Shape(weight, start=2, end=3), axis=0)  # [1, S, O]
    pick = op.Expand(op.Unsqueeze(expert, [0, 2]), shape)  # [1, S, O]
    return op.Squeeze(op.GatherElements(every, pick, axis=0), [0])


def moe_translations() -> dict:
    """{op: translation} for the MoE ops this process has registered (transformers registers its op when its MoE
    integration is imported); {} where none is."""
    import torch

    try:
        fallback = torch.ops.transformers.grouped_mm_fallback.default
    except (AttributeError, RuntimeError):
        return {}
    return {fallback: grouped_mm}
