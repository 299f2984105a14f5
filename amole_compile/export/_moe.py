"""ONNX translations of the grouped matmul that transformers' MoE experts run on: `transformers::grouped_mm_fallback`
(its custom op where `torch.nn.functional.grouped_mm` is unavailable, as for float32 on CPU) and `aten._grouped_mm`
with offsets (bf16 experts; torch.onnx's own translation refuses offsets). Without them, no model with such experts
(Mixtral, OLMoE, Qwen3-MoE, ...) exported to ONNX, adapted or not.

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


def aten_grouped_mm(self: TX, mat2: TX, offs: TI | None = None, bias: TX | None = None, out_dtype: int | None = None):
    """`aten._grouped_mm` in the MoE form (input [S, D], weight [E, D, O], offs [E], no bias, the input's dtype) as
    `grouped_mm`; any other form raises, naming it."""
    ranks = tuple(None if v.shape is None else len(v.shape) for v in (self, mat2))
    if offs is None or bias is not None or ranks != (2, 3) or out_dtype not in (None, self.dtype):
        raise NotImplementedError(f"aten._grouped_mm has an ONNX translation only in the MoE form (a 2-D input, a "
                                  f"3-D weight, offsets, no bias, no out_dtype); got ranks {ranks}, offsets "
                                  f"{offs is not None}, bias {bias is not None}, out_dtype {out_dtype}")
    return grouped_mm(self, mat2, offs)


def moe_translations() -> dict:
    """{op: translation} for the MoE ops this process has registered (transformers registers its op when its MoE
    integration is imported), and aten's."""
    import torch

    table = {torch.ops.aten._grouped_mm.default: aten_grouped_mm}
    try:
        table[torch.ops.transformers.grouped_mm_fallback.default] = grouped_mm
    except (AttributeError, RuntimeError):
        pass
    return table
