"""Per-token routing epilogues (plain torch), forward and hand-written backward.

The torch path of the routing math (docs/math.md). The op's torch path (`adapter_torch.py`) routes one adapter
with scalar constants (`routing`); mixed batches (`mixed_torch.py`) call the same per-method functions with
per-row constants and padded experts (`method_routing`). The Triton twin (`routing_triton.py`) and the ONNX
translation must match it. Methods come from `methods.py`.
Legend: T tokens (any leading dims), E experts, Er router rows (E + 1 for adamole, E for mole, 0 for lora).

adamole  p = softmax(l), tau = cap * sigmoid(u + b), a = p - tau, m = a >= 0,
         w = a m / S with S = sum(a m) and S == 0 -> 1.          scores = a (shifted)
mole     p = softmax(l), m = top-k(l), w = p m / sum(p m).       scores = p
lora     w = 1, m = 1.                                            scores = 1
All routing math runs in float32.

Constants (cap, top_k) are Python numbers, or tensors [T, 1] (per token or row, broadcasting) for mixed
batches; padded experts carry a -inf gate logit (p = 0) and a False in `valid`, which keeps them unselected.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .methods import ADAMOLE, LORA, MOLE, method_spec


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


class Routing(NamedTuple):
    """One routing of T tokens, with what its backward needs (so the backward routes once)."""

    w: Tensor  # [T, E] expert weights (ones [T, 1] for lora)
    scores: Tensor  # [T, E] shifted scores (adamole), probabilities (mole), ones (lora)
    mask: Tensor  # [T, E] bool, experts selected
    p: Tensor | None = None  # [T, E] softmax of the gate logits
    sig: Tensor | None = None  # [T, 1] sigmoid of the threshold logit (adamole)
    s: Tensor | None = None  # [T, 1] normaliser


def adamole_routing(p: Tensor, u: Tensor, cap: float | Tensor, valid: Tensor | None = None) -> Routing:
    """p [T, E] gate probabilities, u [T, 1] threshold logit (bias added), cap a number or [T, 1];
    valid [T, E] bool (False: a padded expert) -> `Routing`."""
    sig = torch.sigmoid(u)  # [T, 1]
    a = p - cap * sig  # [T, E] shifted scores
    m = a >= 0
    if valid is not None:  # a padded expert has a = -tau, which is 0 when tau is
        m = m & valid
    w, s = _normalise(a * m)
    return Routing(w, a, m, p, sig, s)


def top_k_mask(logits: Tensor, top_k: int | Tensor, max_k: int | None = None) -> Tensor:
    """logits [T, E] -> bool [T, E], the top_k largest per token. top_k an int, or a tensor [T, 1] of counts
    up to the int `max_k` (a mixed batch's largest)."""
    if max_k is None:
        idx = torch.topk(logits, top_k, dim=-1).indices  # [T, k]
        return torch.zeros_like(logits, dtype=torch.bool).scatter(-1, idx, True)
    idx = torch.topk(logits, max_k, dim=-1).indices  # [T, kmax]
    keep = torch.arange(max_k, device=logits.device) < top_k  # [T, kmax]: the first top_k of each token
    return torch.zeros_like(logits, dtype=torch.bool).scatter(-1, idx, keep.expand_as(idx))


def mole_routing(p: Tensor, logits: Tensor, top_k: int | Tensor, max_k: int | None = None) -> Routing:
    """p [T, E] gate probabilities of logits [T, E]; top_k as `top_k_mask` -> `Routing`."""
    m = top_k_mask(logits, top_k, max_k)
    w, s = _normalise(p * m)
    return Routing(w, p, m, p, None, s)


def lora_routing(mask: Tensor, dtype: torch.dtype) -> Routing:
    """mask [T, E] bool: the one expert (E = 1, all True), or its column among padded experts -> w = scores =
    the mask in `dtype`."""
    ones = mask.to(dtype)
    return Routing(ones, ones, mask)


def method_routing(code: int, p: Tensor, logits: Tensor, u: Tensor | None, cap: float | Tensor,
                   top_k: int | Tensor, max_k: int | None = None, valid: Tensor | None = None) -> Routing:
    """The routing of method `code` (`MethodSpec.code`) from p = softmax(logits) [T, E] and the threshold logit
    u [T, 1] (adamole); constants as the per-method functions. A new method adds its branch here."""
    if code == ADAMOLE.code:
        return adamole_routing(p, u, cap, valid)
    if code == MOLE.code:
        return mole_routing(p, logits, top_k, max_k)
    if code == LORA.code:
        return lora_routing(logits.new_ones(p.shape, dtype=torch.bool) if valid is None else valid.expand_as(p),
                            p.dtype)
    raise NotImplementedError(f"no torch routing for method code {code}")


def routing(zr: Tensor, thr_b: Tensor | None, method: str, num_experts: int, top_k: int, cap: float) -> Routing:
    """zr [T, Er] float32 router logits of one adapter -> `Routing`."""
    spec = method_spec(method)
    if not spec.has_gate:
        return lora_routing(zr.new_ones(zr.shape[0], 1, dtype=torch.bool), zr.dtype)
    logits = zr[:, :num_experts] if spec.has_threshold else zr  # [T, E]
    u = zr[:, num_experts:] + thr_b.to(zr.dtype) if spec.has_threshold else None  # [T, 1]
    return method_routing(spec.code, _softmax(logits), logits, u, cap, top_k)


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
