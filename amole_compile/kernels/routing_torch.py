"""Per-token routing epilogues (plain torch), forward and hand-written backward.

The torch path of the routing math (docs/math.md): the op's torch path (`adapter_torch.py`) calls it, and the
Triton twin (`routing_triton.py`) and the ONNX translation must match it. Methods come from `methods.py`.
Legend: T tokens, E experts, Er router rows (E + 1 for adamole, E for mole, 0 for lora).

adamole  p = softmax(l), tau = cap * sigmoid(u + b), a = p - tau, m = a >= 0,
         w = a m / S with S = sum(a m) and S == 0 -> 1.          scores = a (shifted)
mole     p = softmax(l), m = top-k(l), w = p m / sum(p m).       scores = p
lora     w = 1, m = 1.                                            scores = 1
All routing math runs in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .methods import method_spec


def _normalise(num: Tensor) -> tuple[Tensor, Tensor]:
    """num [T, E] >= 0 -> (w [T, E], S [T, 1]) with S == 0 replaced by 1, as the upstream implementation does."""
    s = num.sum(-1, keepdim=True)
    s = torch.where(s == 0, torch.ones_like(s), s)
    return num / s, s


def _softmax(logits: Tensor) -> Tensor:
    """Softmax over the experts [T, E]. On CPU as max-shifted exp over its sum: torch's CPU softmax over a last
    dimension this short is 4x slower (148 vs 34 us at [1024, 8], fp32, one thread); on other devices its
    fused kernel. The two agree to a few ulps."""
    if logits.device.type != "cpu":
        return torch.softmax(logits, dim=-1)
    e = (logits - logits.amax(-1, keepdim=True)).exp()  # out of place: autograd differentiates this too
    return e / e.sum(-1, keepdim=True)


def _adamole_parts(zr: Tensor, thr_b: Tensor, num_experts: int, cap: float):
    logits, u = zr[:, :num_experts], zr[:, num_experts] + thr_b.to(zr.dtype)  # [T, E], [T]
    p = _softmax(logits)
    sig = torch.sigmoid(u)[:, None]  # [T, 1]
    a = p - cap * sig  # [T, E]
    m = a >= 0
    return p, sig, a, m


def _mole_parts(zr: Tensor, top_k: int):
    p = _softmax(zr)  # [T, E]
    idx = torch.topk(zr, top_k, dim=-1).indices  # [T, k]
    m = torch.zeros_like(p, dtype=torch.bool).scatter(-1, idx, True)
    return p, m


class Routing(NamedTuple):
    """One routing of T tokens, with what its backward needs (so the backward routes once)."""

    w: Tensor  # [T, E] expert weights (ones [T, 1] for lora)
    scores: Tensor  # [T, E] shifted scores (adamole), probabilities (mole), ones (lora)
    mask: Tensor  # [T, E] bool, experts selected
    p: Tensor | None = None  # [T, E] softmax of the gate logits
    sig: Tensor | None = None  # [T, 1] sigmoid of the threshold logit (adamole)
    s: Tensor | None = None  # [T, 1] normaliser


def routing(zr: Tensor, thr_b: Tensor | None, method: str, num_experts: int, top_k: int, cap: float) -> Routing:
    """zr [T, Er] float32 router logits -> `Routing`."""
    t, spec = zr.shape[0], method_spec(method)
    if not spec.has_gate:
        ones = zr.new_ones(t, 1)
        return Routing(ones, ones, ones.bool())
    if spec.has_threshold:
        p, sig, a, m = _adamole_parts(zr, thr_b, num_experts, cap)
        w, s = _normalise(a * m)
        return Routing(w, a, m, p, sig, s)
    p, m = _mole_parts(zr, top_k)
    w, s = _normalise(p * m)
    return Routing(w, p, m, p, None, s)


def route(zr: Tensor, thr_b: Tensor | None, method: str, num_experts: int, top_k: int, cap: float):
    """zr [T, Er] float32 router logits -> (w [T, E], scores [T, E], mask [T, E] bool)."""
    r = routing(zr, thr_b, method, num_experts, top_k, cap)
    return r.w, r.scores, r.mask


def route_backward(
    zr: Tensor,
    thr_b: Tensor | None,
    grad_w: Tensor,
    grad_scores: Tensor | None,
    method: str,
    num_experts: int,
    top_k: int,
    cap: float,
    fwd: Routing | None = None,
) -> tuple[Tensor, Tensor]:
    """Gradients of (w, scores) w.r.t. zr [T, Er] and the threshold bias [1] (empty for non-adamole).
    `fwd`: this routing, when the caller has it (else routed again)."""
    spec = method_spec(method)
    if not spec.has_gate:
        return zr.new_zeros(zr.shape), zr.new_zeros(0)
    r = fwd if fwd is not None else routing(zr, thr_b, method, num_experts, top_k, cap)
    p, m, w, s = r.p, r.mask, r.w, r.s
    g_num = (grad_w - (grad_w * w).sum(-1, keepdim=True)) / s  # [T, E]
    g_p = g_num * m
    if grad_scores is not None:
        g_p = g_p + grad_scores
    g_logits = p * (g_p - (g_p * p).sum(-1, keepdim=True))  # softmax backward, [T, E]
    if not spec.has_threshold:
        return g_logits, zr.new_zeros(0)
    g_u = -g_p.sum(-1, keepdim=True) * cap * r.sig * (1 - r.sig)  # through tau = cap * sigmoid(u), [T, 1]
    return torch.cat([g_logits, g_u], dim=-1), g_u.sum().reshape(1)
