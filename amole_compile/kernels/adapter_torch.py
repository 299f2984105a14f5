"""The torch path of the AdaMoLE op: the dense formulation in plain torch, forward and hand-written backward.

This is the ground truth the Triton kernels (`adapter_triton.py`) are tested against, and what runs on CPU.
The math is in docs/math.md; the methods come from `methods.py`.

Legend: T tokens, D input dims, O output dims, E experts, R rank per expert, K = E * R,
Er router rows (`MethodSpec.router_rows`: E + 1 for adamole, gate rows then the threshold row; E for mole; 0 for lora).

    xd = x * drop_mask * drop_scale            (x when there is no dropout)
    za = xd A^T                   [T, K]       all experts' down-projections, computed as drop_scale (xm A^T)
                                               with xm = x * keep (keep: the mask cast to x's dtype): one pass
                                               over [T, D], the scale on the narrow [T, K] side
    zr = x [Wg; wt]^T             [T, Er]      gate logits and threshold logit, in float32 whatever x's dtype (a
                                               float16 logit overflows; in float32 and float64, one GEMM with za
                                               when there is no dropout)
    w  = route(zr)                [T, E]       `routing_torch.route`
    h  = scale * w_e * za_e       [T, K]       expert e's block scaled by its weight
    out = base + h B^T            [T, O]
    aux = E / T^2 * dot(sum_t mask, sum_t scores)   []   the load-balancing loss (`with_aux`, a method with a gate):
                                  E * sum_e mean_t(mask) mean_t(scores); `aux_sums` [2, E] holds E / T^2 * sum_t mask
                                  (d aux / d scores[t, e], the same for every t) and sum_t scores
"""

from __future__ import annotations

import torch
from torch import Tensor

from .routing_torch import route, route_backward, routing


def route_dtype(dtype: torch.dtype) -> torch.dtype:
    """Routing runs in float32 (float64 for float64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def router_weight(gate_w: Tensor | None, thr_w: Tensor | None, x: Tensor) -> Tensor:
    """The stacked router weight [Wg; wt] [Er, D] (an empty [0, D] for LoRA)."""
    parts = [t for t in (gate_w, thr_w) if t is not None]
    return torch.cat(parts, 0) if parts else x.new_zeros(0, x.shape[1])  # [Er, D]


def router_logits(x: Tensor, rw: Tensor) -> Tensor:
    """x [T, D], rw [Er, D] -> zr [T, Er] in the routing dtype, computed in it (as HF's MoE routers do, and as the
    Triton kernels accumulate): float16 logits overflow to inf beyond 65504, bfloat16 ones keep 8 bits."""
    rd = route_dtype(x.dtype)
    return x.to(rd) @ rw.to(rd).t()


def _down(x: Tensor, drop_mask: Tensor | None, drop_scale: float, lora_a: Tensor, rw: Tensor):
    """x [T, D] -> (za [T, K], zr [T, Er] float32)."""
    if drop_mask is None and x.dtype == route_dtype(x.dtype):
        z = x @ torch.cat([lora_a, rw], 0).t()  # one skinny GEMM reads x once, [T, K + Er]
        za, zr = z.split([lora_a.shape[0], rw.shape[0]], dim=1)
        return za.contiguous(), zr.to(x.dtype, copy=True)  # a copy: outputs of the op must not alias
    xd = x if drop_mask is None else _dropped(x, drop_mask)
    za = xd @ lora_a.t()
    return (za if drop_mask is None else za.mul_(drop_scale)), router_logits(x, rw)


def _dropped(x: Tensor, drop_mask: Tensor) -> Tensor:
    """x with the dropped elements zeroed, unscaled (the caller scales the narrow side of its GEMM): the mask cast
    to x's dtype, multiplied in place. One new [T, D] tensor: on CPU `x * mask` and `torch.where(mask, x, 0)`
    allocate a cast of the mask besides the result, or take a slow bool path (3-20x slower)."""
    return drop_mask.to(x.dtype).mul_(x)


def _scaled_h(za: Tensor, w: Tensor, scale: float) -> Tensor:
    """za [T, K], w [T, E] -> h [T, K] with expert e's R columns times scale * w[:, e]."""
    t, k = za.shape
    e = w.shape[1]
    return (za.view(t, e, k // e) * (scale * w).to(za.dtype)[:, :, None]).view(t, k)


def as_dtype(w: Tensor, dtype: torch.dtype) -> Tensor:
    """w in `dtype` (w itself when it is: `Tensor.to` costs ~1 us of host time even then)."""
    return w if w.dtype == dtype else w.to(dtype)


def up_project(h: Tensor, lora_b: Tensor, base: Tensor | None, own_base: bool = False) -> Tensor:
    """h [T, K] -> base + h B^T [T, O] (in base's dtype when given; added into base itself when `own_base`: a
    tensor the caller made for this, such as the frozen projection's output in `op.adapter_linear`)."""
    if base is None:
        return h @ lora_b.t()
    if base.dtype == h.dtype:
        return base.addmm_(h, lora_b.t()) if own_base else torch.addmm(base, h, lora_b.t())
    return base + (h @ lora_b.t()).to(base.dtype)


def wants_aux(with_aux: bool, gate_w: Tensor | None, t: int) -> bool:
    """Is the aux loss computed: asked for, a method with a gate, and at least one token."""
    return with_aux and gate_w is not None and t > 0


def aux_loss(scores: Tensor, mask: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """scores [T, E] float, mask [T, E] bool (T > 0) -> (aux [], aux_sums [2, E]); see the module doc."""
    t = scores.shape[0]
    sums = torch.stack([mask.sum(0, dtype=scores.dtype) * (num_experts / (t * t)), scores.sum(0)])  # [2, E]
    return torch.dot(sums[0], sums[1]), sums


def no_aux(x: Tensor) -> tuple[Tensor, Tensor]:
    """The aux outputs when none is computed: two empty tensors (no launch)."""
    return x.new_empty(0, dtype=route_dtype(x.dtype)), x.new_empty(0, dtype=route_dtype(x.dtype))


def adapter_torch(x: Tensor, drop_mask: Tensor | None, lora_a: Tensor, lora_b: Tensor, gate_w: Tensor | None,
                  thr_w: Tensor | None, thr_b: Tensor | None, base: Tensor | None, method: str, num_experts: int,
                  top_k: int, scale: float, max_threshold: float, drop_scale: float, with_aux: bool = False,
                  own_base: bool = False):
    """Plain-torch forward of the dense formulation (the ground truth of the Triton kernels)
    -> (out, scores, mask, za, zr, aux, aux_sums); `own_base`: out may be base itself (`up_project`)."""
    za, zr = _down(x, drop_mask, drop_scale, lora_a, router_weight(gate_w, thr_w, x))
    w, scores, mask = route(zr, thr_b, method, num_experts, top_k, max_threshold)
    h = _scaled_h(za, w, scale)
    out = up_project(h, lora_b, base, own_base)
    scores = scores.to(zr.dtype)
    aux = aux_loss(scores, mask, num_experts) if wants_aux(with_aux, gate_w, x.shape[0]) else no_aux(x)
    return out, scores, mask, za, zr, *aux


def scores_grad(grad_scores: Tensor | None, grad_aux: Tensor | None, aux_sums: Tensor | None,
                t: int) -> Tensor | None:
    """The gradient reaching the scores [T, E]: grad_scores's, plus the aux loss's grad_aux * aux_sums[0] (the
    same row for every token)."""
    if grad_aux is None or aux_sums is None or aux_sums.numel() == 0:
        return grad_scores
    g = (grad_aux * aux_sums[0]).expand(t, -1)  # [T, E]
    return g if grad_scores is None else grad_scores + g


def adapter_backward_torch(grad_out, grad_scores, x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, za, zr,
                           method, num_experts, top_k, scale, max_threshold, drop_scale, need_grad_x,
                           grad_aux=None, aux_sums=None):
    """Plain-torch backward: grads for x, A, B, gate, threshold weight and bias (`grad_aux`: the aux loss's
    gradient, with the forward's `aux_sums`)."""
    t, k = za.shape
    grad_scores = scores_grad(grad_scores, grad_aux, aux_sums, t)
    fwd = routing(zr, thr_b, method, num_experts, top_k, max_threshold)  # routed once, for h and the backward
    w = fwd.w
    h = _scaled_h(za, w, scale)
    grad_b = grad_out.t() @ h  # [O, K]
    grad_h = grad_out @ lora_b  # [T, K]
    grad_za = _scaled_h(grad_h, w, scale)
    grad_w = scale * (grad_h.to(w.dtype) * za.to(w.dtype)).view(t, w.shape[1], k // w.shape[1]).sum(-1)  # [T, E]
    grad_zr, grad_thr_b = route_backward(zr, thr_b, grad_w, grad_scores, method, num_experts, top_k,
                                         max_threshold, fwd)
    grad_zr = grad_zr.to(x.dtype)
    rw = router_weight(gate_w, thr_w, x)
    grad_x = x.new_empty(0)
    if drop_mask is None:
        grad_z = torch.cat([grad_za, grad_zr], 1)  # [T, K + Er]: one GEMM per gradient, as in the forward
        grad_a, grad_rw = (grad_z.t() @ x).split([k, rw.shape[0]])  # [K, D], [Er, D]
        if need_grad_x:
            grad_x = grad_z @ torch.cat([lora_a, rw], 0)  # [T, D]
    else:
        grad_za = grad_za * drop_scale  # [T, K]: the dropout's scale on the narrow side
        keep = drop_mask.to(x.dtype)  # [T, D] 0 / 1, cast once for both uses
        grad_a = grad_za.t() @ (x * keep)  # [K, D]
        grad_rw = grad_zr.t() @ x  # [Er, D]
        if need_grad_x:
            grad_x = (grad_za @ lora_a).mul_(keep).addmm_(grad_zr, rw)  # [T, D]
    n_gate = 0 if gate_w is None else gate_w.shape[0]
    grad_gate, grad_thr_w = grad_rw[:n_gate], grad_rw[n_gate:]
    return (grad_x, grad_a.contiguous(), grad_b, grad_gate.clone(), grad_thr_w.clone(), grad_thr_b.to(x.dtype))
