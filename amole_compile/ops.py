"""The AdaMoLE op: `torch.ops.amole.adapter`, the narrow waist every path calls.

One registered op (autograd through a second op `amole::adapter_backward`) holding the dense formulation of
DESIGN.md for all three methods. Static shapes, no data-dependent indexing. Both ops are `torch.library.triton_op`s:
their bodies call only torch ops (the plain-torch path) or `wrap_triton` kernels (the Triton path, chosen by
`resolve_backend`), so the body doubles as the fake kernel and `torch.compile` traces through it, while
`torch.export` keeps `amole.adapter` as one node (which the ONNX exporter translates).

Legend: T tokens, D input dims, O output dims, E experts, R rank per expert, K = E * R,
Er router rows (E + 1 for adamole: gate rows then the threshold row; E for mole; 0 for lora).

    xd = x * drop_mask * drop_scale            (x when there is no dropout)
    za = xd A^T                   [T, K]       all experts' down-projections
    zr = x [Wg; wt]^T             [T, Er]      gate logits and threshold logit (one GEMM with za when no dropout)
    w  = route(zr)                [T, E]       `_routing.route`
    h  = scale * w_e * za_e       [T, K]       expert e's block scaled by its weight
    out = base + h B^T            [T, O]

Outputs: (out, scores [T, E], mask [T, E] bool, za [T, K], zr [T, Er]); routing (zr, scores) is float32
(float64 for float64 inputs). `za` and `zr` are saved for the backward, which recomputes the cheap routing
instead of storing it.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ._routing import route, route_backward

_LIB = "amole"


def resolve_backend(requested: str, x: Tensor) -> str:
    """'auto' | 'torch' | 'triton' (AMOLE_KERNELS overrides) -> the backend that will run: 'torch' or 'triton'."""
    choice = os.environ.get("AMOLE_KERNELS", requested) or "auto"
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"AMOLE_KERNELS must be one of auto, torch, triton; got {choice!r}")
    if choice == "torch":
        return "torch"
    from .kernels import triton_usable  # imports triton lazily

    ok, why = triton_usable(x, explicit=choice == "triton")
    if choice == "triton" and not ok:
        raise RuntimeError(f"amole kernels='triton' was asked for but cannot run: {why}")
    return "triton" if ok else "torch"


def _use_triton(backend: str, x: Tensor) -> bool:
    """Triton for this call? Under TRITON_INTERPRET=1 kernels run eagerly and cannot be traced, so a traced
    call (fake tensors: torch.compile, opcheck's fake checks) takes the torch path, which computes the same."""
    if resolve_backend(backend, x) != "triton":
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not (os.environ.get("TRITON_INTERPRET") == "1" and is_fake(x))


def route_dtype(dtype: torch.dtype) -> torch.dtype:
    """Routing runs in float32 (float64 for float64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _router_weight(gate_w: Optional[Tensor], thr_w: Optional[Tensor], x: Tensor) -> Tensor:
    parts = [t for t in (gate_w, thr_w) if t is not None]
    return torch.cat(parts, 0) if parts else x.new_zeros(0, x.shape[1])  # [Er, D]


def _down(x: Tensor, drop_mask: Optional[Tensor], drop_scale: float, lora_a: Tensor, rw: Tensor):
    """x [T, D] -> (za [T, K], zr [T, Er] float32)."""
    if drop_mask is None:
        z = x @ torch.cat([lora_a, rw], 0).t()  # one skinny GEMM reads x once, [T, K + Er]
        za, zr = z.split([lora_a.shape[0], rw.shape[0]], dim=1)
        return za.contiguous(), zr.to(route_dtype(x.dtype), copy=True)
    za = (x * drop_mask * drop_scale) @ lora_a.t()
    return za, (x @ rw.t()).to(route_dtype(x.dtype))


def _scaled_h(za: Tensor, w: Tensor, scale: float) -> Tensor:
    """za [T, K], w [T, E] -> h [T, K] with expert e's R columns times scale * w[:, e]."""
    t, k = za.shape
    e = w.shape[1]
    return (za.view(t, e, k // e) * (scale * w).to(za.dtype)[:, :, None]).view(t, k)


def _up(h: Tensor, lora_b: Tensor, base: Optional[Tensor]) -> Tensor:
    """h [T, K] -> base + h B^T [T, O] (in base's dtype when given)."""
    if base is None:
        return h @ lora_b.t()
    if base.dtype == h.dtype:
        return torch.addmm(base, h, lora_b.t())
    return base + (h @ lora_b.t()).to(base.dtype)


def adapter_torch(x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, base, method, num_experts, top_k,
                  scale, max_threshold, drop_scale):
    """Plain-torch forward of the dense formulation (the reference for the Triton kernels)."""
    za, zr = _down(x, drop_mask, drop_scale, lora_a, _router_weight(gate_w, thr_w, x))
    w, scores, mask = route(zr, thr_b, method, num_experts, top_k, max_threshold)
    h = _scaled_h(za, w, scale)
    out = _up(h, lora_b, base)
    return out, scores.to(zr.dtype), mask, za, zr


def adapter_backward_torch(grad_out, grad_scores, x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, za, zr,
                           method, num_experts, top_k, scale, max_threshold, drop_scale, need_grad_x):
    """Plain-torch backward: grads for x, A, B, gate, threshold weight and bias."""
    t, k = za.shape
    w, _, _ = route(zr, thr_b, method, num_experts, top_k, max_threshold)
    h = _scaled_h(za, w, scale)
    grad_b = grad_out.t() @ h  # [O, K]
    grad_h = grad_out @ lora_b  # [T, K]
    grad_za = _scaled_h(grad_h, w, scale)
    grad_w = scale * (grad_h.to(w.dtype) * za.to(w.dtype)).view(t, w.shape[1], k // w.shape[1]).sum(-1)  # [T, E]
    grad_zr, grad_thr_b = route_backward(zr, thr_b, grad_w, grad_scores, method, num_experts, top_k,
                                         max_threshold)
    grad_zr = grad_zr.to(x.dtype)
    xd = x if drop_mask is None else x * drop_mask * drop_scale
    grad_a = grad_za.t() @ xd  # [K, D]
    rw = _router_weight(gate_w, thr_w, x)
    grad_rw = grad_zr.t() @ x  # [Er, D]
    if not need_grad_x:
        grad_x = x.new_empty(0)
    elif drop_mask is None:
        grad_x = torch.cat([grad_za, grad_zr], 1) @ torch.cat([lora_a, rw], 0)  # [T, D]
    else:
        grad_x = (grad_za @ lora_a) * drop_mask * drop_scale + grad_zr @ rw
    n_gate = 0 if gate_w is None else gate_w.shape[0]
    grad_gate, grad_thr_w = grad_rw[:n_gate], grad_rw[n_gate:]
    return grad_x, grad_a, grad_b, grad_gate.clone(), grad_thr_w.clone(), grad_thr_b.to(x.dtype)


# ---- registration ---------------------------------------------------------------------------------

@torch.library.triton_op(f"{_LIB}::adapter", mutates_args=())
def adapter(
    x: Tensor, drop_mask: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, gate_w: Optional[Tensor],
    thr_w: Optional[Tensor], thr_b: Optional[Tensor], base: Optional[Tensor], method: str, num_experts: int,
    top_k: int, scale: float, max_threshold: float, drop_scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """AdaMoLE / MoLE / LoRA adapter on x [T, D] -> (out [T, O], scores, mask, za, zr); see module doc."""
    args = (x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, base, method, num_experts, top_k, scale,
            max_threshold, drop_scale)
    if _use_triton(backend, x):
        from .kernels.adapter import adapter_triton

        return adapter_triton(*args)
    return adapter_torch(*args)


@torch.library.triton_op(f"{_LIB}::adapter_backward", mutates_args=())
def adapter_backward(
    grad_out: Tensor, grad_scores: Optional[Tensor], x: Tensor, drop_mask: Optional[Tensor], lora_a: Tensor,
    lora_b: Tensor, gate_w: Optional[Tensor], thr_w: Optional[Tensor], thr_b: Optional[Tensor], za: Tensor,
    zr: Tensor, method: str, num_experts: int, top_k: int, scale: float, max_threshold: float,
    drop_scale: float, need_grad_x: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Grads (x, A, B, gate, threshold weight, threshold bias); empty tensors for absent parameters."""
    args = (grad_out, grad_scores, x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, za, zr, method,
            num_experts, top_k, scale, max_threshold, drop_scale, need_grad_x)
    if _use_triton(backend, x):
        from .kernels.adapter import adapter_backward_triton

        return adapter_backward_triton(*args)
    return adapter_backward_torch(*args)


_TENSOR_ARGS = ("x", "drop_mask", "lora_a", "lora_b", "gate_w", "thr_w", "thr_b", "base")
_SCALAR_ARGS = ("method", "num_experts", "top_k", "scale", "max_threshold", "drop_scale", "backend")


def _setup_context(ctx, inputs, output):
    named = dict(zip(_TENSOR_ARGS + _SCALAR_ARGS, inputs, strict=True))
    x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b = (named[n] for n in _TENSOR_ARGS[:7])
    ctx.save_for_backward(x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, output[3], output[4])
    ctx.scalars = tuple(named[n] for n in _SCALAR_ARGS)
    ctx.has_base = named["base"] is not None


def _backward(ctx, grad_out, grad_scores, _grad_mask, _grad_za, _grad_zr):
    x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, za, zr = ctx.saved_tensors
    method, e, k, scale, cap, drop_scale, backend = ctx.scalars
    if grad_out is None:
        grad_out = x.new_zeros(x.shape[0], lora_b.shape[0])
    need_x = ctx.needs_input_grad[0]
    gx, ga, gb, gg, gtw, gtb = adapter_backward(
        grad_out.to(x.dtype).contiguous(), grad_scores, x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, za, zr,
        method, e, k, scale, cap, drop_scale, need_x, backend)
    return (gx if need_x else None, None, ga, gb, gg if gate_w is not None else None,
            gtw if thr_w is not None else None, gtb if thr_b is not None else None,
            grad_out if ctx.has_base else None) + (None,) * len(_SCALAR_ARGS)


adapter.register_autograd(_backward, setup_context=_setup_context)
