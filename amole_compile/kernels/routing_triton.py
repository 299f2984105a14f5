"""Triton routing epilogue, shared by the forward and backward kernels (the twin of `routing_torch.py`).

Legend: BT tokens in the block, E_P experts padded to a power of two, G_P router rows padded (>= 16).
METHOD is `MethodSpec.code` (methods.py): 0 adamole, 1 mole, 2 lora. All routing math in float32.
"""

import triton
import triton.language as tl

from .methods import ADAMOLE, LORA

# The method codes the kernels branch on (METHOD constexpr); Triton reads globals only as constexprs.
ADAMOLE_CODE = tl.constexpr(ADAMOLE.code)
LORA_CODE = tl.constexpr(LORA.code)


@triton.jit
def gate_and_threshold(acc_r, thr_b, E, BT: tl.constexpr, E_P: tl.constexpr, G_P: tl.constexpr):
    """Router accumulator [BT, G_P] (rows: E gate logits, then the threshold logit) ->
    (gate logits [BT, E_P] with -inf padding, threshold logit + bias [BT])."""
    col = tl.arange(0, G_P)[None, :]
    gate = tl.where(col < E, acc_r, 0.0)
    if G_P != E_P:
        gate = tl.sum(tl.reshape(gate, (BT, G_P // E_P, E_P)), axis=1)
    ecol = tl.arange(0, E_P)[None, :]
    logits = tl.where(ecol < E, gate, float("-inf"))
    u = tl.sum(tl.where(col == E, acc_r, 0.0), axis=1) + thr_b
    return logits, u


@triton.jit
def softmax_rows(logits):
    mx = tl.max(logits, axis=1)
    ex = tl.exp(logits - mx[:, None])
    return ex / tl.sum(ex, axis=1)[:, None]


@triton.jit
def topk_mask(logits, E, TOP_K: tl.constexpr, E_P: tl.constexpr):
    """[BT, E_P] -> bool mask of the TOP_K largest logits per row (lowest index wins a tie)."""
    ecol = tl.arange(0, E_P)[None, :]
    sel = ecol < 0
    for _ in tl.static_range(TOP_K):
        cand = tl.where(sel | (ecol >= E), float("-inf"), logits)
        mx = tl.max(cand, axis=1)
        first = tl.min(tl.where(cand == mx[:, None], ecol, E_P), axis=1)
        sel = sel | (ecol == first[:, None])
    return sel


@triton.jit
def route(logits, u, cap, E, METHOD: tl.constexpr, TOP_K: tl.constexpr, E_P: tl.constexpr):
    """-> (w, scores, mask [BT, E_P], p [BT, E_P], sigmoid(u) [BT], S [BT])."""
    ecol = tl.arange(0, E_P)[None, :]
    valid = ecol < E
    if METHOD == LORA_CODE:
        ones = tl.where(valid, 1.0, 0.0) + 0.0 * logits
        return ones, ones, valid & (ones > 0), ones, u * 0.0, u * 0.0 + 1.0
    p = softmax_rows(logits)
    sig = tl.sigmoid(u)
    if METHOD == ADAMOLE_CODE:
        scores = p - cap * sig[:, None]
        m = (scores >= 0) & valid
        num = tl.where(m, scores, 0.0)
    else:
        scores = p
        m = topk_mask(logits, E, TOP_K, E_P)
        num = tl.where(m, p, 0.0)
    s = tl.sum(num, axis=1)
    s = tl.where(s == 0, 1.0, s)
    return num / s[:, None], scores, m, p, sig, s


@triton.jit
def route_backward(grad_w, grad_scores, w, m, p, sig, s, cap, E, METHOD: tl.constexpr, E_P: tl.constexpr):
    """Gradients of (w, scores) -> (gate logits [BT, E_P], threshold logit [BT]); see `_routing.route_backward`."""
    ecol = tl.arange(0, E_P)[None, :]
    g_num = (grad_w - tl.sum(grad_w * w, axis=1)[:, None]) / s[:, None]
    g_p = tl.where(m, g_num, 0.0) + grad_scores
    g_p = tl.where(ecol < E, g_p, 0.0)
    g_logits = p * (g_p - tl.sum(g_p * p, axis=1)[:, None])
    g_u = -tl.sum(g_p, axis=1) * cap * sig * (1.0 - sig)
    if METHOD != ADAMOLE_CODE:
        g_u = g_u * 0.0
    return g_logits, g_u
