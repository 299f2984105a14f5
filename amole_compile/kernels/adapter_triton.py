"""Triton kernels of the AdaMoLE op's forward, and the launchers; `adapter_torch.py` is the ground truth they
match. The backward's kernels are in `adapter_triton_bwd.py`, what both share in `triton_common.py` (legend there).

forward   _fwd_kernel         program (T block, D split): x·[A; Wg; wt]ᵀ over its columns of D (dropout applied to
                              the A part only) -> float32 partial sums [S, T, K_P] and [S, T, G_P]
          _fwd_finish_kernel  the S partials summed, then the routing epilogue -> za, h = scale·w·za, zr, scores,
                              mask, and (HAS_AUX) the block's column sums of mask·E/T² and scores.
          out = base + h Bᵀ (addmm); the aux loss is the dot of the summed column sums (2 ATen launches).
The split over D keeps the grid at >= MIN_PROGRAMS programs however few the tokens (one program per 64 tokens
left an H100 mostly idle at T = 1024); the finishing kernel takes FINISH_BT tokens per program.
No per-expert copies of activations are saved: the op saves x, the dropout mask, za [T, K] and zr [T, Er].
The launchers only call torch ops and Triton kernels, so `torch.compile` can see through them: under tracing
(fake tensors, torch.compile, make_fx) kernels go through `wrap_triton`; in eager mode they launch directly, since
`wrap_triton`'s higher-order-op dispatch costs more host time per launch than the kernels take on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import blocks
from .adapter_torch import adapter_torch, no_aux, router_weight, up_project, wants_aux
from .adapter_triton_bwd import adapter_backward_triton  # noqa: F401  (the op's Triton path: both directions)
from .backend import traced
from .plans import forward_plan
from .routing_triton import gate_and_threshold, route
from .triton_common import _ld, _pad_cols, _sum_splits, as_dtype, keep_arg, launch, padded, upcast


@triton.jit
def _fwd_kernel(x_ptr, keep_ptr, a_ptr, rw_ptr, wsa_ptr, wsr_ptr, T, D, drop_scale, d_per,
                HAS_KEEP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BT: tl.constexpr,
                BD: tl.constexpr, K_P: tl.constexpr, G_P: tl.constexpr):
    """Program (T block, D split of d_per columns) -> its partial sums wsa [S, T, K_P], wsr [S, T, G_P]."""
    pid_t, pid_s = tl.program_id(0), tl.program_id(1)
    rt = pid_t * BT + tl.arange(0, BT)
    kp = tl.arange(0, K_P)
    gp = tl.arange(0, G_P)
    acc_a = tl.zeros((BT, K_P), dtype=tl.float32)  # [BT, K_P]
    acc_r = tl.zeros((BT, G_P), dtype=tl.float32)  # [BT, G_P]
    d_start = pid_s * d_per
    for d0 in range(d_start, d_start + d_per, BD):
        rd = d0 + tl.arange(0, BD)
        io = (rt[:, None] < T) & (rd[None, :] < D)
        x = _ld(x_ptr + rt[:, None] * D + rd[None, :], io, UPCAST)  # [BT, BD]
        a = _ld(a_ptr + kp[:, None] * D + rd[None, :], rd[None, :] < D, UPCAST)  # [K_P, BD]
        g = _ld(rw_ptr + gp[:, None] * D + rd[None, :], rd[None, :] < D, UPCAST)  # [G_P, BD]
        acc_r += tl.dot(x, tl.trans(g), input_precision=PRECISION)
        if HAS_KEEP:
            keep = tl.load(keep_ptr + rt[:, None] * D + rd[None, :], mask=io, other=0)
            x = tl.where(keep != 0, x * drop_scale, 0.0).to(x.dtype)
        acc_a += tl.dot(x, tl.trans(a), input_precision=PRECISION)
    row = pid_s * T + rt[:, None]
    tl.store(wsa_ptr + row * K_P + kp[None, :], acc_a, mask=rt[:, None] < T)
    tl.store(wsr_ptr + row * G_P + gp[None, :], acc_r, mask=rt[:, None] < T)


@triton.jit
def _fwd_finish_kernel(wsa_ptr, wsr_ptr, thr_b_ptr, za_ptr, h_ptr, zr_ptr, scores_ptr, sel_ptr, parts_ptr,
                       T, E, R, ER, S, scale, cap, aux_scale,
                       METHOD: tl.constexpr, TOP_K: tl.constexpr, HAS_AUX: tl.constexpr, BT: tl.constexpr,
                       E_P: tl.constexpr, R_P: tl.constexpr, G_P: tl.constexpr):
    """Program (BT tokens): the partial sums over the D splits, then the routing epilogue."""
    rt = tl.program_id(0) * BT + tl.arange(0, BT)
    gp = tl.arange(0, G_P)
    acc_a = _sum_splits(wsa_ptr, S, T, rt, E_P * R_P, BT)  # [BT, K_P]
    acc_r = _sum_splits(wsr_ptr, S, T, rt, G_P, BT)  # [BT, G_P]
    thr_b = tl.load(thr_b_ptr).to(tl.float32)
    logits, u = gate_and_threshold(acc_r, thr_b, E, BT, E_P, G_P)
    w, scores, m, _, _, _ = route(logits, u, cap, E, METHOD, TOP_K, E_P)
    h = tl.reshape(tl.reshape(acc_a, (BT, E_P, R_P)) * (scale * w)[:, :, None], (BT, E_P * R_P))
    col, ok = _pad_cols(E, R, E_P, R_P)
    out = (rt[:, None] < T) & ok[None, :]
    tl.store(za_ptr + rt[:, None] * (E * R) + col[None, :], acc_a.to(za_ptr.dtype.element_ty), mask=out)
    tl.store(h_ptr + rt[:, None] * (E * R) + col[None, :], h.to(h_ptr.dtype.element_ty), mask=out)
    tl.store(zr_ptr + rt[:, None] * ER + gp[None, :], acc_r, mask=(rt[:, None] < T) & (gp[None, :] < ER))
    ecol = tl.arange(0, E_P)
    eo = (rt[:, None] < T) & (ecol[None, :] < E)
    tl.store(scores_ptr + rt[:, None] * E + ecol[None, :], scores, mask=eo)
    tl.store(sel_ptr + rt[:, None] * E + ecol[None, :], m.to(tl.int8), mask=eo)
    if HAS_AUX:  # this block's column sums [E]: of mask·E/T² (row 0) and of scores (row 1)
        part = parts_ptr + tl.program_id(0) * 2 * E + ecol
        tl.store(part, tl.sum(tl.where(eo & m, aux_scale, 0.0), axis=0), mask=ecol < E)
        tl.store(part + E, tl.sum(tl.where(eo, scores, 0.0), axis=0), mask=ecol < E)


_ZERO_ROWS: dict = {}  # (device, dtype, rows, D) -> zeros: the router's padding rows, made once


def _stacked_router(x, gate_w, thr_w, g_p: int, wrap: bool) -> torch.Tensor:
    """[Wg; wt; 0] [G_P, D] in x's dtype, as the forward kernel reads it: one `cat` with cached zero rows (a traced
    call pads instead: no cached tensor in a graph). The forward reads the router padded: reading its rows
    unpadded (`_router_ptrs`, as the input-gradient kernel does) spilled registers in the AOT builds (a 32 B stack
    at 255 registers, bf16 K_P 256 on sm_90)."""
    parts = [as_dtype(w, x.dtype) for w in (gate_w, thr_w) if w is not None]
    n_pad, d = g_p - sum(w.shape[0] for w in parts), x.shape[1]
    if wrap:
        return torch.nn.functional.pad(router_weight(gate_w, thr_w, x).to(x.dtype), (0, 0, 0, n_pad))
    key = (x.device, x.dtype, n_pad, d)
    zeros = _ZERO_ROWS.get(key)
    if zeros is None:
        zeros = _ZERO_ROWS[key] = x.new_zeros(n_pad, d)
    return torch.cat([*parts, zeros], 0) if parts else zeros


def adapter_triton(x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, base, method, num_experts, top_k, scale,
                   max_threshold, drop_scale, with_aux=False, wrap=None, own_base=False):
    """Triton forward with the same contract as `adapter_torch.adapter_torch` (`own_base` too); `wrap`: the call
    is traced (`backend.traced(x)` when None)."""
    t, d = x.shape
    if t == 0:
        return adapter_torch(x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, base, method, num_experts,
                             top_k, scale, max_threshold, drop_scale, with_aux, own_base)
    x = x.contiguous()
    wrap = traced(x) if wrap is None else wrap
    keep, has_keep = keep_arg(drop_mask, x)
    p = forward_plan(t, d, num_experts, lora_a.shape[0], method, top_k, x.dtype, has_keep,
                     wants_aux(with_aux, gate_w, t), upcast(x.dtype), blocks.choose)
    f32 = torch.float32
    wsa = x.new_empty(p.splits, t, p.k_p, dtype=f32)  # [S, T, K_P] partial sums over D
    wsr = x.new_empty(p.splits, t, p.g_p, dtype=f32)  # [S, T, G_P]
    a = padded(as_dtype(lora_a, x.dtype), num_experts, p.r, p.geo, rows=True)  # [K_P, D]
    rw = _stacked_router(x, gate_w, thr_w, p.g_p, wrap)
    launch(_fwd_kernel, p.main, (x, keep, a, rw, wsa, wsr, t, d, drop_scale, p.per), wrap)
    k = lora_a.shape[0]
    za, h = x.new_empty(t, k), x.new_empty(t, k)
    zr = x.new_empty(t, max(p.er, 1), dtype=f32)
    scores = x.new_empty(t, num_experts, dtype=f32)
    sel = x.new_empty(t, num_experts, dtype=torch.int8)
    parts = x.new_empty(p.n_f, 2, num_experts, dtype=f32) if p.has_aux else scores  # [blocks, 2, E] column sums
    launch(_fwd_finish_kernel, p.finish,
           (wsa, wsr, x if thr_b is None else thr_b, za, h, zr, scores, sel, parts, t, num_experts, p.r, p.er,
            p.splits, scale, max_threshold, p.aux_scale), wrap)
    if p.has_aux:
        sums = parts.sum(0)  # [2, E]
        aux = torch.dot(sums[0], sums[1]), sums
    else:
        aux = no_aux(x)
    # sel holds 0 / 1: viewed as bool, no cast
    return up_project(h, lora_b, base, own_base), scores, sel.view(torch.bool), za, zr[:, :p.er], *aux
