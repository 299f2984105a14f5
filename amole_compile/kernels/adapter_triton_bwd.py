"""Triton kernels of the AdaMoLE op's backward, and its launcher (`adapter_backward_triton`); the forward is in
`adapter_triton.py`, what both share in `triton_common.py` (legend there). Ground truth: `adapter_torch.py`.

backward  _bwd_route_kernel        program (T block, O split): grad_h = grad_out·B over its columns of O -> float32
                                   partial sums [S, T, K_P]
          _bwd_route_finish_kernel the S partials summed, recomputed routing -> grad_za, grad_zr, and the threshold
                                   bias's gradient per block (the scores' gradient plus, HAS_AUX, the aux loss's:
                                   grad_aux·E/T²·sum_t mask)
          _bwd_weight_kernel       grad_A = grad_zaᵀ·xd and grad_[Wg; wt] = grad_zrᵀ·x in one pass over x (split over
                                   T, and over K in chunks of BK columns when K_P is large) -> float32 partials
          _bwd_reduce_kernel       those partials summed over the T splits, in each parameter's dtype
          _bwd_input_kernel        grad_x = (grad_za·A)·mask + grad_zr·[Wg; wt]
          grad_B = grad_outᵀ·h (GEMM)
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import blocks
from .adapter_torch import adapter_backward_torch
from .backend import traced
from .blocks import Blocks
from .methods import method_spec
from .routing_triton import ADAMOLE_CODE, LORA_CODE, gate_and_threshold, route, route_backward
from .triton_common import (
    MIN_PROGRAMS,
    _ld,
    _pad_cols,
    _router_ptrs,
    _sum_splits,
    cdiv,
    few_tokens,
    finish_blocks,
    geometry,
    keep_arg,
    launch,
    modes,
    padded,
    router_rows,
    split_tiles,
    weights,
)


@triton.jit
def _bwd_route_kernel(go_ptr, b_ptr, wsg_ptr, T, N_OUT, o_per, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                      BT: tl.constexpr, BO: tl.constexpr, K_P: tl.constexpr):
    """Program (T block, O split of o_per columns) -> its partial sums of grad_h, wsg [S, T, K_P]."""
    pid_t, pid_s = tl.program_id(0), tl.program_id(1)
    rt = pid_t * BT + tl.arange(0, BT)
    kp = tl.arange(0, K_P)
    acc = tl.zeros((BT, K_P), dtype=tl.float32)  # grad_h [BT, K_P]
    o_start = pid_s * o_per
    for o0 in range(o_start, o_start + o_per, BO):
        ro = o0 + tl.arange(0, BO)
        go = _ld(go_ptr + rt[:, None] * N_OUT + ro[None, :], (rt[:, None] < T) & (ro[None, :] < N_OUT), UPCAST)
        b = _ld(b_ptr + ro[:, None] * K_P + kp[None, :], ro[:, None] < N_OUT, UPCAST)  # [BO, K_P]
        acc += tl.dot(go, b, input_precision=PRECISION)
    tl.store(wsg_ptr + (pid_s * T + rt[:, None]) * K_P + kp[None, :], acc, mask=rt[:, None] < T)


@triton.jit
def _bwd_route_finish_kernel(wsg_ptr, za_ptr, zr_ptr, thr_b_ptr, gs_ptr, gaux_ptr, sums_ptr, gza_ptr, gzr_ptr, h_ptr,
                             gtb_ptr, T, E, R, ER, S, scale, cap,
                             METHOD: tl.constexpr, TOP_K: tl.constexpr, HAS_GS: tl.constexpr, HAS_AUX: tl.constexpr,
                             BT: tl.constexpr, E_P: tl.constexpr, R_P: tl.constexpr, G_P: tl.constexpr):
    """Program (BT tokens): grad_h summed over the O splits, then the routing backward."""
    pid = tl.program_id(0)
    rt = pid * BT + tl.arange(0, BT)
    acc = _sum_splits(wsg_ptr, S, T, rt, E_P * R_P, BT)  # grad_h [BT, K_P]
    col, ok = _pad_cols(E, R, E_P, R_P)
    tk = (rt[:, None] < T) & ok[None, :]
    za = _ld(za_ptr + rt[:, None] * (E * R) + col[None, :], tk, True)
    gp = tl.arange(0, G_P)
    acc_r = tl.load(zr_ptr + rt[:, None] * ER + gp[None, :], mask=(rt[:, None] < T) & (gp[None, :] < ER), other=0.0)
    thr_b = tl.load(thr_b_ptr).to(tl.float32)
    logits, u = gate_and_threshold(acc_r, thr_b, E, BT, E_P, G_P)
    w, _, m, p, sig, s = route(logits, u, cap, E, METHOD, TOP_K, E_P)
    gh3 = tl.reshape(acc, (BT, E_P, R_P))
    za3 = tl.reshape(za, (BT, E_P, R_P))
    gza = tl.reshape(gh3 * (scale * w)[:, :, None], (BT, E_P * R_P))
    h = tl.reshape(za3 * (scale * w)[:, :, None], (BT, E_P * R_P))
    tl.store(gza_ptr + rt[:, None] * (E * R) + col[None, :], gza.to(gza_ptr.dtype.element_ty), mask=tk)
    tl.store(h_ptr + rt[:, None] * (E * R) + col[None, :], h.to(h_ptr.dtype.element_ty), mask=tk)
    if METHOD != LORA_CODE:
        ecol = tl.arange(0, E_P)
        eo = (rt[:, None] < T) & (ecol[None, :] < E)
        grad_w = scale * tl.sum(gh3 * za3, axis=2)  # [BT, E_P]
        gs = tl.zeros((BT, E_P), dtype=tl.float32)
        if HAS_GS:
            gs = tl.load(gs_ptr + rt[:, None] * E + ecol[None, :], mask=eo, other=0.0).to(tl.float32)
        if HAS_AUX:  # d aux / d scores[t, e] = grad_aux · E/T² · sum_t mask[:, e], the same for every t
            w_aux = tl.load(sums_ptr + ecol, mask=ecol < E, other=0.0).to(tl.float32)  # [E_P]
            gs += tl.where(eo, tl.load(gaux_ptr).to(tl.float32) * w_aux[None, :], 0.0)
        g_logits, g_u = route_backward(grad_w, gs, w, m, p, sig, s, cap, E, METHOD, E_P)
        g_u = tl.where(rt < T, g_u, 0.0)
        tl.store(gzr_ptr + rt[:, None] * ER + ecol[None, :], g_logits.to(gzr_ptr.dtype.element_ty), mask=eo)
        if METHOD == ADAMOLE_CODE:
            tl.store(gzr_ptr + rt * ER + E, g_u.to(gzr_ptr.dtype.element_ty), mask=rt < T)
            tl.store(gtb_ptr + pid, tl.sum(g_u, axis=0))


@triton.jit
def _bwd_weight_kernel(gza_ptr, gzr_ptr, x_ptr, keep_ptr, ga_ptr, gr_ptr, T, D, E, R, ER, drop_scale, rows_per_split,
                       HAS_KEEP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BT: tl.constexpr,
                       BD: tl.constexpr, BK: tl.constexpr, E_P: tl.constexpr, R_P: tl.constexpr, G_P: tl.constexpr):
    """Program (D block, T split, K chunk of BK padded columns); the router rows are stored by K chunk 0."""
    pid_d, split, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rd = pid_d * BD + tl.arange(0, BD)
    col, ok = _pad_cols(E, R, E_P, R_P, pid_k * BK, BK)
    gp = tl.arange(0, G_P)
    n_r = tl.where(pid_k == 0, ER, 0)  # router rows this program accumulates
    acc_a = tl.zeros((BK, BD), dtype=tl.float32)
    acc_r = tl.zeros((G_P, BD), dtype=tl.float32)
    t_start = split * rows_per_split
    for t0 in range(t_start, t_start + rows_per_split, BT):
        rt = t0 + tl.arange(0, BT)
        tin = (rt < T) & (rt < t_start + rows_per_split)
        io = tin[:, None] & (rd[None, :] < D)
        x = _ld(x_ptr + rt[:, None] * D + rd[None, :], io, UPCAST)  # [BT, BD]
        gza = _ld(gza_ptr + rt[:, None] * (E * R) + col[None, :], tin[:, None] & ok[None, :], UPCAST)
        gzr = _ld(gzr_ptr + rt[:, None] * ER + gp[None, :], tin[:, None] & (gp[None, :] < n_r), UPCAST)
        acc_r += tl.dot(tl.trans(gzr), x, input_precision=PRECISION)
        if HAS_KEEP:
            keep = tl.load(keep_ptr + rt[:, None] * D + rd[None, :], mask=io, other=0)
            x = tl.where(keep != 0, x * drop_scale, 0.0).to(x.dtype)
        acc_a += tl.dot(tl.trans(gza), x, input_precision=PRECISION)
    base = split * D
    tl.store(ga_ptr + (base * (E * R)) + col[:, None] * D + rd[None, :], acc_a, mask=ok[:, None] & (rd[None, :] < D))
    tl.store(gr_ptr + (base * ER) + gp[:, None] * D + rd[None, :], acc_r,
             mask=(gp[:, None] < n_r) & (rd[None, :] < D))


@triton.jit
def _bwd_reduce_kernel(ga_ptr, gr_ptr, gtb_ptr, grad_a_ptr, grad_g_ptr, grad_tw_ptr, grad_tb_ptr,
                       SPLIT, KD, ED, ERD, GR_STRIDE, N_TB, BLOCK: tl.constexpr):
    """The weight-gradient kernel's float32 partials [SPLIT, ...] summed over the T splits and written in each
    gradient's dtype: element i of [grad_A (KD); grad_Wg (ED); grad_wt (ERD - ED)] per lane. Program 0 also sums
    the route kernel's N_TB per-block partials of the threshold bias's gradient (N_TB 0: none)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat index
    j = i - KD  # the router rows' flat index
    in_a, in_r = i < KD, (j >= 0) & (j < ERD)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(ga_ptr + s * KD + i, mask=in_a, other=0.0)
        acc += tl.load(gr_ptr + s * GR_STRIDE + j, mask=in_r, other=0.0)
    tl.store(grad_a_ptr + i, acc.to(grad_a_ptr.dtype.element_ty), mask=in_a)
    tl.store(grad_g_ptr + j, acc.to(grad_g_ptr.dtype.element_ty), mask=in_r & (j < ED))
    tl.store(grad_tw_ptr + (j - ED), acc.to(grad_tw_ptr.dtype.element_ty), mask=in_r & (j >= ED))
    if (tl.program_id(0) == 0) & (N_TB > 0):
        tb = tl.zeros((BLOCK,), dtype=tl.float32)
        for t0 in range(0, N_TB, BLOCK):
            it = t0 + tl.arange(0, BLOCK)
            tb += tl.load(gtb_ptr + it, mask=it < N_TB, other=0.0)
        tl.store(grad_tb_ptr, tl.sum(tb, axis=0).to(grad_tb_ptr.dtype.element_ty))


@triton.jit
def _bwd_input_kernel(gza_ptr, gzr_ptr, a_ptr, g_ptr, t_ptr, keep_ptr, gx_ptr, T, D, E, R, NG, ER, drop_scale,
                      HAS_KEEP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BT: tl.constexpr,
                      BD: tl.constexpr, E_P: tl.constexpr, R_P: tl.constexpr, G_P: tl.constexpr):
    rt = tl.program_id(0) * BT + tl.arange(0, BT)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    kp = tl.arange(0, E_P * R_P)
    gp = tl.arange(0, G_P)
    col, ok = _pad_cols(E, R, E_P, R_P)
    gza = _ld(gza_ptr + rt[:, None] * (E * R) + col[None, :], (rt[:, None] < T) & ok[None, :], UPCAST)
    gzr = _ld(gzr_ptr + rt[:, None] * ER + gp[None, :], (rt[:, None] < T) & (gp[None, :] < ER), UPCAST)
    a = _ld(a_ptr + kp[:, None] * D + rd[None, :], rd[None, :] < D, UPCAST)  # [K_P, BD]
    g_rows, g_ok = _router_ptrs(g_ptr, t_ptr, gp, D, NG, ER)
    g = _ld(g_rows[:, None] + rd[None, :], g_ok[:, None] & (rd[None, :] < D), UPCAST)  # [G_P, BD]
    io = (rt[:, None] < T) & (rd[None, :] < D)
    gx = tl.dot(gza, a, input_precision=PRECISION)
    if HAS_KEEP:
        keep = tl.load(keep_ptr + rt[:, None] * D + rd[None, :], mask=io, other=0)
        gx = tl.where(keep != 0, gx * drop_scale, 0.0)
    gx += tl.dot(gzr, g, input_precision=PRECISION)
    tl.store(gx_ptr + rt[:, None] * D + rd[None, :], gx.to(gx_ptr.dtype.element_ty), mask=io)


# ---- launcher ---------------------------------------------------------------------------------------------------

def adapter_backward_triton(grad_out, grad_scores, x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, za, zr,
                            method, num_experts, top_k, scale, max_threshold, drop_scale, need_grad_x,
                            grad_aux=None, aux_sums=None):
    """Triton backward with the same contract as `adapter_torch.adapter_backward_torch`."""
    t, d = x.shape
    if t == 0:
        return adapter_backward_torch(grad_out, grad_scores, x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, za,
                                      zr, method, num_experts, top_k, scale, max_threshold, drop_scale, need_grad_x,
                                      grad_aux, aux_sums)
    e, k = num_experts, lora_a.shape[0]
    r, er = k // e, router_rows(method, e)
    geo = geometry(e, r, er)
    k_p = geo["E_P"] * geo["R_P"]
    x, grad_out, wrap = x.contiguous(), grad_out.contiguous(), traced(x)
    gza, h, gzr, gtb = _route(grad_out, grad_scores, lora_b, za, zr, thr_b, grad_aux, aux_sums, method, e, r, er,
                              top_k, scale, max_threshold, geo, wrap)
    grad_b = grad_out.t() @ h  # [O, K]
    grads = _weight_grads(gza, gzr, gtb if thr_b is not None else None, x, drop_mask, lora_a, gate_w, thr_w, e, r,
                          er, drop_scale, geo, wrap)
    grad_x = x.new_empty(0)
    if need_grad_x:
        grad_x = x.new_empty(t, d)
        a, g, tw, _, n_gate = weights(x, lora_a, gate_w, thr_w, thr_b, e, r, geo)
        keep, has_keep = keep_arg(drop_mask, x)
        blk = blocks.choose("bwd_input", k_p, x.dtype)
        blk = few_tokens(blk, cdiv(t, blk.bt) * cdiv(d, blk.bd))
        launch(_bwd_input_kernel, (cdiv(t, blk.bt), cdiv(d, blk.bd)),
               (gza, gzr, a, g, tw, keep, grad_x, t, d, e, r, n_gate, er, drop_scale),
               dict(HAS_KEEP=has_keep, **modes(x.dtype), BT=blk.bt, BD=blk.bd, **geo), blk, wrap)
    grad_a, grad_gate, grad_thr_w, grad_tb = grads
    return grad_x, grad_a, grad_b.to(lora_b.dtype), grad_gate, grad_thr_w, grad_tb


def _route(grad_out, grad_scores, lora_b, za, zr, thr_b, grad_aux, aux_sums, method, e, r, er, top_k, scale,
           max_threshold, geo, wrap):
    """grad_h in O splits, then the routing backward -> (grad_za [T, K], h [T, K], grad_zr [T, Er], the threshold
    bias's gradient per block of tokens [blocks] float32)."""
    t, o = grad_out.shape
    k_p, x = geo["E_P"] * geo["R_P"], grad_out
    blk, splits, per = split_tiles("bwd_route", k_p, x.dtype, t, o)
    wsg = x.new_empty(splits, t, k_p, dtype=torch.float32)  # [S, T, K_P] partial sums of grad_h over O
    launch(_bwd_route_kernel, (cdiv(t, blk.bt), splits),
           (grad_out, padded(lora_b.to(x.dtype), e, r, geo, rows=False), wsg, t, o, per),
           dict(**modes(x.dtype), BT=blk.bt, BO=blk.bd, K_P=k_p), blk, wrap)
    fin = finish_blocks(k_p)
    n_f = cdiv(t, fin.bt)
    gza, h = x.new_empty(t, e * r), x.new_empty(t, e * r)
    gzr = x.new_empty(t, max(er, 1))
    gtb = x.new_empty(n_f, dtype=torch.float32)  # the threshold bias's gradient per block of tokens
    zr = zr.contiguous() if er else gtb  # (LoRA: a float32 placeholder, never read)
    gs = grad_scores.contiguous() if grad_scores is not None else zr
    has_aux = grad_aux is not None and aux_sums is not None and aux_sums.numel() > 0 and er > 0
    launch(_bwd_route_finish_kernel, (n_f,),
           (wsg, za.contiguous(), zr, x if thr_b is None else thr_b, gs, grad_aux if has_aux else zr,
            aux_sums if has_aux else zr, gza, gzr, h, gtb, t, e, r, er, splits, scale, max_threshold),
           dict(METHOD=method_spec(method).code, TOP_K=max(top_k, 1), HAS_GS=grad_scores is not None,
                HAS_AUX=has_aux, BT=fin.bt, **geo), fin, wrap)
    return gza, h, gzr, gtb


def _t_split(t: int, blk: Blocks, programs: int) -> tuple[int, int]:
    """How many T splits the weight-gradient kernel sums over, and the rows of each (a multiple of BT): at least
    `blk.split_t`, and enough that `programs` per split reach MIN_PROGRAMS, up to one BT block per split."""
    want = max(blk.split_t, cdiv(MIN_PROGRAMS, programs))
    rows = max(blk.bt, t // want // blk.bt * blk.bt)
    return cdiv(t, rows), rows


@functools.lru_cache(maxsize=1024)
def _reduce_blocks(n: int) -> Blocks:
    """_bwd_reduce_kernel over n elements: 256 per program, fewer (down to 32) until the grid has MIN_PROGRAMS."""
    block = 256
    while block > 32 and cdiv(n, block) < MIN_PROGRAMS:
        block //= 2
    return Blocks(1, block, num_warps=max(1, block // 64), num_stages=1)


def _weight_grads(gza, gzr, gtb, x, drop_mask, lora_a, gate_w, thr_w, e, r, er, drop_scale, geo, wrap):
    """-> (grad_A [K, D] in A's dtype, grad_Wg [E, D], grad_wt [1, D], grad_bt [1]; in x's dtype, [0, ...] when
    absent): float32 partial sums over T splits (`_bwd_weight_kernel`), then summed (`_bwd_reduce_kernel`, which
    also sums the threshold bias's per-block partials `gtb`)."""
    t, d = x.shape
    k, k_p = e * r, geo["E_P"] * geo["R_P"]
    blk = blocks.choose("bwd_weight", k_p, x.dtype)
    bk = min(blk.bk or k_p, k_p)
    per_split = cdiv(d, blk.bd) * (k_p // bk)
    blk = few_tokens(blk, per_split * cdiv(t, blk.bt))
    split, rows = _t_split(t, blk, per_split)
    ga = x.new_empty(split, k, d, dtype=torch.float32)
    gr = x.new_empty(split, max(er, 1), d, dtype=torch.float32)
    keep, has_keep = keep_arg(drop_mask, x)
    launch(_bwd_weight_kernel, (cdiv(d, blk.bd), split, k_p // bk),
           (gza, gzr, x, keep, ga, gr, t, d, e, r, er, drop_scale, rows),
           dict(HAS_KEEP=has_keep, **modes(x.dtype), BT=blk.bt, BD=blk.bd, BK=bk, **geo), blk, wrap)
    out = (x.new_empty(k, d, dtype=lora_a.dtype), x.new_empty(0 if gate_w is None else gate_w.shape[0], d),
           x.new_empty(0 if thr_w is None else 1, d), x.new_empty(0 if gtb is None else 1))
    n_gate = out[1].shape[0]
    red = _reduce_blocks((k + er) * d)
    launch(_bwd_reduce_kernel, (cdiv((k + er) * d, red.bd),),
           (ga, gr, ga if gtb is None else gtb, *(v if v.numel() else ga for v in out), split, k * d, n_gate * d,
            er * d, max(er, 1) * d, 0 if gtb is None else gtb.numel()),
           dict(BLOCK=red.bd), red, wrap)
    return out
