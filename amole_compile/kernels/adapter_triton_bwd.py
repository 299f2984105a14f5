"""Triton kernels of the AdaMoLE op's backward, and its launchers (`adapter_backward_triton_group` for a group
of G sites as `adapter_triton.py` describes them, `adapter_backward_triton` its group of one); the forward is in
`adapter_triton.py`, what both share in `triton_common.py` (legend there). Ground truth: `adapter_torch.py`.
Stacked: [G, ...].

backward  _bwd_route_kernel        program (T block, O split), one launch per site: grad_h = grad_out_g·B_g over its
                                   columns of O -> float32 partial sums, site g's [S, T, K_P] of [G, S, T, K_P]
                                   (S from the largest O: a split past a site's O writes zeros)
          _bwd_route_finish_kernel program (T block, site g): the S partials summed, recomputed routing -> grad_za,
                                   grad_zr, and the threshold bias's gradient per block (the scores' gradient plus,
                                   HAS_AUX, the aux loss's: grad_aux·E/T²·sum_t mask)
          _bwd_weight_kernel       grad_A = grad_zaᵀ·xd and grad_[Wg; wt] = grad_zrᵀ·x in one pass over x (split over
                                   T, over the sites, and over K in chunks of BK columns when K_P is large) ->
                                   float32 partials
          _bwd_reduce_kernel       program (block, site g): those partials summed over the T splits, in each
                                   parameter's dtype, stacked [G, ...] (the per-site results are views)
          _bwd_input_kernel        program (T block, D block), one launch per site: grad_x (+)= (grad_za_g·A_g)·mask_g
                                   + grad_zr_g·[Wg_g; wt_g], site 0 storing, the others adding theirs (ADD). One
                                   launch looping over the sites held its loop-invariant offsets and masks in
                                   registers: 255 and spills at BT 64 in the AOT builds (bf16 K_P 256, fp16 K_P 512)
          grad_B_g = grad_out_gᵀ·h_g (a GEMM per site)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import blocks
from .adapter_torch import adapter_backward_torch
from .backend import traced
from .plans import backward_plan
from .routing_triton import ADAMOLE_CODE, LORA_CODE, gate_and_threshold, route, route_backward
from .triton_common import (
    _ld,
    _pad_cols,
    _router_ptrs,
    _sum_splits,
    as_dtype,
    keep_arg,
    launch,
    padded,
    stacked_bias,
    upcast,
    weights,
)


@triton.jit
def _bwd_route_kernel(go_ptr, b_ptr, wsg_ptr, T, N_OUT, LD, o_per, ws_off, PRECISION: tl.constexpr,
                      UPCAST: tl.constexpr, BT: tl.constexpr, BO: tl.constexpr, K_P: tl.constexpr):
    """Program (T block, O split of o_per columns) -> its partial sums of grad_h, wsg [S, T, K_P] at element
    ws_off (one site's part of the stacked [G, S, T, K_P]); a split past N_OUT writes zeros. grad_out's rows are
    LD apart: a fused projection's column block of its output's gradient is read in place, not copied."""
    pid_t, pid_s = tl.program_id(0), tl.program_id(1)
    rt = pid_t * BT + tl.arange(0, BT)
    kp = tl.arange(0, K_P)
    acc = tl.zeros((BT, K_P), dtype=tl.float32)  # grad_h [BT, K_P]
    o_start = pid_s * o_per
    for o0 in range(o_start, o_start + o_per, BO):
        ro = o0 + tl.arange(0, BO)
        go = _ld(go_ptr + rt[:, None] * LD + ro[None, :], (rt[:, None] < T) & (ro[None, :] < N_OUT), UPCAST)
        b = _ld(b_ptr + ro[:, None] * K_P + kp[None, :], ro[:, None] < N_OUT, UPCAST)  # [BO, K_P]
        acc += tl.dot(go, b, input_precision=PRECISION)
    wsg_ptr += ws_off
    tl.store(wsg_ptr + (pid_s * T + rt[:, None]) * K_P + kp[None, :], acc, mask=rt[:, None] < T)


@triton.jit
def _bwd_route_finish_kernel(wsg_ptr, za_ptr, zr_ptr, thr_b_ptr, gs_ptr, gaux_ptr, sums_ptr, gza_ptr, gzr_ptr, h_ptr,
                             gtb_ptr, T, E, R, ER, S, THR_GS, scale, cap,
                             METHOD: tl.constexpr, TOP_K: tl.constexpr, HAS_GS: tl.constexpr, HAS_AUX: tl.constexpr,
                             BT: tl.constexpr, E_P: tl.constexpr, R_P: tl.constexpr, G_P: tl.constexpr,
                             GROUPED: tl.constexpr):
    """Program (BT tokens, site g): grad_h summed over the O splits, then the routing backward; inputs and outputs
    stacked [G, ...], the threshold bias at thr_b_ptr + g * THR_GS. Site g's [T, ...] rows are addressed as rows
    g·T + t, and its partials at g·S·T·K_P, in 32 bits (G·T·K_P < 2³¹; S·T is T, or at most 264·BT when S > 1, as
    `_sum_splits` assumes for one site): 64-bit offsets left 8 B stacks (fp32 K_P 128 and 512 on sm_90, 1024 on
    sm_80) in the AOT builds."""
    pid, g = tl.program_id(0), tl.program_id(1) * GROUPED
    rt = pid * BT + tl.arange(0, BT)
    rows = g * T + rt  # site g's rows of the stacked [G * T, ...] (32-bit, as one site's rt * K: G·T·K < 2³¹)
    acc = _sum_splits(wsg_ptr + g * (S * T * (E_P * R_P)), S, T, rt, E_P * R_P, BT)  # grad_h [BT, K_P]
    col, ok = _pad_cols(E, R, E_P, R_P)
    tk = (rt[:, None] < T) & ok[None, :]
    za = _ld(za_ptr + rows[:, None] * (E * R) + col[None, :], tk, True)
    gp = tl.arange(0, G_P)
    acc_r = tl.load(zr_ptr + rows[:, None] * ER + gp[None, :], mask=(rt[:, None] < T) & (gp[None, :] < ER), other=0.0)
    thr_b = tl.load(thr_b_ptr + g * THR_GS).to(tl.float32)
    logits, u = gate_and_threshold(acc_r, thr_b, E, BT, E_P, G_P)
    w, _, m, p, sig, s = route(logits, u, cap, E, METHOD, TOP_K, E_P)
    gh3 = tl.reshape(acc, (BT, E_P, R_P))
    za3 = tl.reshape(za, (BT, E_P, R_P))
    gza = tl.reshape(gh3 * (scale * w)[:, :, None], (BT, E_P * R_P))
    h = tl.reshape(za3 * (scale * w)[:, :, None], (BT, E_P * R_P))
    tl.store(gza_ptr + rows[:, None] * (E * R) + col[None, :], gza.to(gza_ptr.dtype.element_ty), mask=tk)
    tl.store(h_ptr + rows[:, None] * (E * R) + col[None, :], h.to(h_ptr.dtype.element_ty), mask=tk)
    if METHOD != LORA_CODE:
        ecol = tl.arange(0, E_P)
        eo = (rt[:, None] < T) & (ecol[None, :] < E)
        grad_w = scale * tl.sum(gh3 * za3, axis=2)  # [BT, E_P]
        gs = tl.zeros((BT, E_P), dtype=tl.float32)
        if HAS_GS:
            gs = tl.load(gs_ptr + rows[:, None] * E + ecol[None, :], mask=eo, other=0.0).to(tl.float32)
        if HAS_AUX:  # d aux / d scores[t, e] = grad_aux · E/T² · sum_t mask[:, e], the same for every t
            w_aux = tl.load(sums_ptr + g * 2 * E + ecol, mask=ecol < E, other=0.0).to(tl.float32)  # [E_P]
            gs += tl.where(eo, tl.load(gaux_ptr + g).to(tl.float32) * w_aux[None, :], 0.0)
        g_logits, g_u = route_backward(grad_w, gs, w, m, p, sig, s, cap, E, METHOD, E_P)
        g_u = tl.where(rt < T, g_u, 0.0)
        tl.store(gzr_ptr + rows[:, None] * ER + ecol[None, :], g_logits.to(gzr_ptr.dtype.element_ty), mask=eo)
        if METHOD == ADAMOLE_CODE:
            tl.store(gzr_ptr + rows * ER + E, g_u.to(gzr_ptr.dtype.element_ty), mask=rt < T)
            tl.store(gtb_ptr + g * tl.num_programs(0) + pid, tl.sum(g_u, axis=0))


@triton.jit
def _bwd_weight_kernel(gza_ptr, gzr_ptr, x_ptr, keep_ptr, ga_ptr, gr_ptr, T, D, E, R, ER, drop_scale, rows_per_split,
                       HAS_KEEP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BT: tl.constexpr,
                       BD: tl.constexpr, BK: tl.constexpr, E_P: tl.constexpr, R_P: tl.constexpr, G_P: tl.constexpr,
                       GROUPED: tl.constexpr):
    """Program (D block, T split, site g x K chunk of BK padded columns) -> partials ga [G, splits, K, D],
    gr [G, splits, Er, D]; the router rows are stored by K chunk 0. Site g's rows of grad_za, grad_zr and the mask
    are g·T + t in 32 bits (G·T·D < 2³¹), its partials' offset 64-bit after the loop (64-bit pointers bumped before
    it: 255 registers and a 120 B stack at fp32 K_P 128 on sm_80 in the AOT builds)."""
    pid_d, split, pid_gk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g = pid_gk // (E_P * R_P // BK) * GROUPED
    pid_k = pid_gk - g * (E_P * R_P // BK)
    site_t = g * T  # site g's first row
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
        rs = site_t + rt
        x = _ld(x_ptr + rt[:, None] * D + rd[None, :], io, UPCAST)  # [BT, BD]
        gza = _ld(gza_ptr + rs[:, None] * (E * R) + col[None, :], tin[:, None] & ok[None, :], UPCAST)
        gzr = _ld(gzr_ptr + rs[:, None] * ER + gp[None, :], tin[:, None] & (gp[None, :] < n_r), UPCAST)
        acc_r += tl.dot(tl.trans(gzr), x, input_precision=PRECISION)
        if HAS_KEEP:
            keep = tl.load(keep_ptr + rs[:, None] * D + rd[None, :], mask=io, other=0)
            x = tl.where(keep != 0, x * drop_scale, 0.0).to(x.dtype)
        acc_a += tl.dot(tl.trans(gza), x, input_precision=PRECISION)
    site = g.to(tl.int64) * tl.num_programs(1) * D  # site g's partials [splits, K, D], [splits, Er, D] follow
    ga_ptr += site * (E * R)
    gr_ptr += site * ER
    base = split * D
    tl.store(ga_ptr + (base * (E * R)) + col[:, None] * D + rd[None, :], acc_a, mask=ok[:, None] & (rd[None, :] < D))
    tl.store(gr_ptr + (base * ER) + gp[:, None] * D + rd[None, :], acc_r,
             mask=(gp[:, None] < n_r) & (rd[None, :] < D))


@triton.jit
def _bwd_reduce_kernel(ga_ptr, gr_ptr, gtb_ptr, grad_a_ptr, grad_g_ptr, grad_tw_ptr, grad_tb_ptr,
                       SPLIT, KD, ED, ERD, GR_STRIDE, N_TB, BLOCK: tl.constexpr, GROUPED: tl.constexpr):
    """Program (BLOCK elements, site g): the weight-gradient kernel's float32 partials [G, SPLIT, ...] summed over
    the T splits and written in each gradient's dtype, stacked [G, ...]: element i of [grad_A (KD); grad_Wg (ED);
    grad_wt (ERD - ED)] per lane. Program (0, g) also sums the route kernel's N_TB per-block partials of the
    threshold bias's gradient [G, N_TB] (N_TB 0: none)."""
    g = (tl.program_id(1) * GROUPED).to(tl.int64)
    ga_ptr += g * SPLIT * KD
    gr_ptr += g * SPLIT * GR_STRIDE
    grad_a_ptr += g * KD
    grad_g_ptr += g * ED
    grad_tw_ptr += g * (ERD - ED)
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
        gtb_ptr += g * N_TB
        tb = tl.zeros((BLOCK,), dtype=tl.float32)
        for t0 in range(0, N_TB, BLOCK):
            it = t0 + tl.arange(0, BLOCK)
            tb += tl.load(gtb_ptr + it, mask=it < N_TB, other=0.0)
        tl.store(grad_tb_ptr + g, tl.sum(tb, axis=0).to(grad_tb_ptr.dtype.element_ty))


@triton.jit
def _bwd_input_kernel(gza_ptr, gzr_ptr, a_ptr, g_ptr, t_ptr, keep_ptr, gx_ptr, T, D, E, R, NG, ER, drop_scale,
                      HAS_KEEP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BT: tl.constexpr,
                      BD: tl.constexpr, E_P: tl.constexpr, R_P: tl.constexpr, G_P: tl.constexpr, ADD: tl.constexpr):
    """Program (T block, D block): one site's grad_x = (grad_za·A)·mask + grad_zr·[Wg; wt], stored, or (ADD) added
    to what gx holds (the sites before it)."""
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
    if ADD:
        gx += tl.load(gx_ptr + rt[:, None] * D + rd[None, :], mask=io, other=0.0).to(tl.float32)
    tl.store(gx_ptr + rt[:, None] * D + rd[None, :], gx.to(gx_ptr.dtype.element_ty), mask=io)


# ---- launcher ---------------------------------------------------------------------------------------------------

def adapter_backward_triton_group(grad_outs, grad_scores, x, drop_masks, lora_as, lora_bs, gate_ws, thr_ws, thr_bs,
                                  za, zr, method, num_experts, top_k, scale, max_threshold, drop_scale, need_grad_x,
                                  grad_aux=None, aux_sums=None, wrap=None):
    """Triton backward of `adapter_triton.adapter_triton_group`'s G sites: per site the contract of
    `adapter_torch.adapter_backward_torch`. grad_outs: G tensors [T, O_g]; grad_scores [G, T, E] or None; za
    [G, T, K], zr [G, T, Er] as the forward returned them; grad_aux [G] or None; aux_sums [G, 2, E] or None ->
    (grad_x [T, D]: the sum of the sites' x gradients (x.new_empty(0) without need_grad_x), then grad_As,
    grad_Bs, grad_gates, grad_thr_ws, grad_thr_bs: lists of G per-site gradients (views into stacked buffers;
    empty where the parameter is absent)); `wrap` as in the forward's launcher."""
    t, d = x.shape
    n = len(lora_as)
    if t == 0:
        return _backward_group_torch(grad_outs, grad_scores, x, drop_masks, lora_as, lora_bs, gate_ws, thr_ws, thr_bs,
                                     za, zr, method, num_experts, top_k, scale, max_threshold, drop_scale,
                                     need_grad_x, grad_aux, aux_sums)
    x, grad_outs = x.contiguous(), [_rows(g) for g in grad_outs]
    wrap = traced(x) if wrap is None else wrap
    keep, has_keep = keep_arg(drop_masks, x)
    gate_w = gate_ws[0]
    has_aux = grad_aux is not None and aux_sums is not None and aux_sums.numel() > 0 and gate_w is not None
    p = backward_plan(t, d, max(g.shape[1] for g in grad_outs), num_experts, lora_as[0].shape[0], method, top_k,
                      x.dtype, has_keep, grad_scores is not None, has_aux, 0 if gate_w is None else gate_w.shape[0],
                      need_grad_x, upcast(x.dtype), blocks.choose, n)
    blocks.check_index(t, d, max(max(g.stride(0), g.shape[1]) for g in grad_outs), n, p.route.constexprs["K_P"])
    gza, h, gzr, gtb = _route(p, grad_outs, grad_scores, lora_bs, za, zr, thr_bs, grad_aux if has_aux else None,
                              aux_sums, num_experts, scale, max_threshold, wrap)
    grad_bs = [as_dtype(go.t() @ h[i], b.dtype) for i, (go, b) in enumerate(zip(grad_outs, lora_bs, strict=True))]
    grads = _weight_grads(p, gza, gzr, gtb if thr_bs[0] is not None else None, x, keep, lora_as, thr_ws, num_experts,
                          drop_scale, wrap)
    grad_x = x.new_empty(0)
    if need_grad_x:
        grad_x = x.new_empty(t, d)
        for i in range(n):  # site 0 stores, the others add theirs
            a, g, tw = weights(x, lora_as[i], gate_ws[i], thr_ws[i], num_experts, p.r, p.geo)
            launch(_bwd_input_kernel, p.input_add if i else p.input,
                   (gza[i], gzr[i], a, g, tw, keep[i] if has_keep else keep, grad_x, t, d, num_experts, p.r, p.n_gate,
                    p.er, drop_scale), wrap)
    grad_as, grad_gates, grad_thr_ws, grad_tbs = grads
    return grad_x, grad_as, grad_bs, grad_gates, grad_thr_ws, grad_tbs


def _rows(g):
    """A site's output gradient [T, O_g] as the route kernel reads it: rows of unit-stride columns, any row stride
    (a fused projection's column block is read in place; the grad_B GEMM takes it strided too); copied otherwise."""
    return g if g.stride(-1) == 1 and g.stride(0) >= g.shape[1] else g.contiguous()


def adapter_backward_triton(grad_out, grad_scores, x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, za, zr,
                            method, num_experts, top_k, scale, max_threshold, drop_scale, need_grad_x,
                            grad_aux=None, aux_sums=None, wrap=None):
    """Triton backward with the same contract as `adapter_torch.adapter_backward_torch`; `wrap` as in the
    forward's launcher. One site of `adapter_backward_triton_group` (its inputs viewed as stacks of one)."""
    if x.shape[0] == 0:
        return adapter_backward_torch(grad_out, grad_scores, x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, za,
                                      zr, method, num_experts, top_k, scale, max_threshold, drop_scale, need_grad_x,
                                      grad_aux, aux_sums)

    def one(v):
        return None if v is None else v.unsqueeze(0)

    grad_x, *grads = adapter_backward_triton_group(
        (grad_out,), one(grad_scores), x, one(drop_mask), (lora_a,), (lora_b,), (gate_w,), (thr_w,), (thr_b,),
        za.unsqueeze(0), zr.unsqueeze(0), method, num_experts, top_k, scale, max_threshold, drop_scale, need_grad_x,
        None if grad_aux is None else grad_aux.reshape(1), one(aux_sums), wrap)
    return grad_x, *(v[0] for v in grads)


def _backward_group_torch(grad_outs, grad_scores, x, drop_masks, lora_as, lora_bs, gate_ws, thr_ws, thr_bs, za, zr,
                          method, e, top_k, scale, max_threshold, drop_scale, need_grad_x, grad_aux, aux_sums):
    """`adapter_backward_triton_group`'s results from the torch path, site by site (no tokens)."""
    def site(v, i):
        return None if v is None else v[i]

    sites = [adapter_backward_torch(grad_outs[i], site(grad_scores, i), x, site(drop_masks, i), lora_as[i],
                                    lora_bs[i], gate_ws[i], thr_ws[i], thr_bs[i], za[i], zr[i], method, e, top_k,
                                    scale, max_threshold, drop_scale, need_grad_x, site(grad_aux, i),
                                    site(aux_sums, i)) for i in range(len(lora_as))]
    grad_xs, *grads = zip(*sites, strict=True)
    return (sum(grad_xs[1:], grad_xs[0]) if need_grad_x else x.new_empty(0)), *map(list, grads)


def _route(p, grad_outs, grad_scores, lora_bs, za, zr, thr_bs, grad_aux, aux_sums, e, scale, max_threshold, wrap):
    """grad_h in O splits (one launch per site), then the routing backward of all sites (`grad_aux` None: no aux
    term) -> (grad_za [G, T, K], h [G, T, K], grad_zr [G, T, Er], the threshold bias's gradient per site and block
    of tokens [G, blocks] float32)."""
    x = grad_outs[0]
    n, t = len(grad_outs), x.shape[0]
    k_p = p.route.constexprs["K_P"]
    wsg = x.new_empty(n, p.o_splits, t, k_p, dtype=torch.float32)  # [G, S, T, K_P] grad_h parts
    for i, (go, b) in enumerate(zip(grad_outs, lora_bs, strict=True)):
        b = padded(as_dtype(b, x.dtype), e, p.r, p.geo, rows=False)  # [O_g, K_P]
        launch(_bwd_route_kernel, p.route, (go, b, wsg, t, go.shape[1], go.stride(0), p.o_per,
                                            i * p.o_splits * t * k_p), wrap)
    k = e * p.r
    gza, h = x.new_empty(n, t, k), x.new_empty(n, t, k)
    gzr = x.new_empty(n, t, max(p.er, 1))
    gtb = x.new_empty(n, p.n_f, dtype=torch.float32)  # the threshold bias's gradient per site and block of tokens
    zr = zr.contiguous() if p.er else gtb  # (LoRA: a float32 placeholder, never read)
    gs = grad_scores.contiguous() if grad_scores is not None else zr
    has_aux = grad_aux is not None
    thr_b, thr_gs = stacked_bias(thr_bs, x)
    launch(_bwd_route_finish_kernel, p.route_finish,
           (wsg, za.contiguous(), zr, thr_b, gs, grad_aux if has_aux else zr, aux_sums if has_aux else zr, gza, gzr,
            h, gtb, t, e, p.r, p.er, p.o_splits, thr_gs, scale, max_threshold), wrap)
    return gza, h, gzr, gtb


def _weight_grads(p, gza, gzr, gtb, x, keep, lora_as, thr_ws, e, drop_scale, wrap):
    """-> (grad_As [K, D] in A's dtype, grad_Wgs [E, D], grad_wts [1, D], grad_bts [1]; in x's dtype, [0, ...]
    when absent; lists of G views into stacked buffers): float32 partial sums over T splits
    (`_bwd_weight_kernel`), then summed (`_bwd_reduce_kernel`, which also sums the threshold bias's per-block
    partials `gtb`)."""
    t, d = x.shape
    n, k = len(lora_as), lora_as[0].shape[0]
    ga = x.new_empty(n, p.t_splits, k, d, dtype=torch.float32)  # [G, splits, K, D]
    gr = x.new_empty(n, p.t_splits, max(p.er, 1), d, dtype=torch.float32)  # [G, splits, Er, D]
    launch(_bwd_weight_kernel, p.weight, (gza, gzr, x, keep, ga, gr, t, d, e, p.r, p.er, drop_scale, p.t_rows),
           wrap)
    out = (x.new_empty(n, k, d, dtype=lora_as[0].dtype), x.new_empty(n, p.n_gate, d),
           x.new_empty(n, 0 if thr_ws[0] is None else 1, d), x.new_empty(n, 0 if gtb is None else 1))
    kd, gd, erd, stride = p.reduce_sizes
    launch(_bwd_reduce_kernel, p.reduce,
           (ga, gr, ga if gtb is None else gtb, *(v if v.numel() else ga for v in out), p.t_splits, kd, gd, erd,
            stride, 0 if gtb is None else gtb.shape[1]), wrap)
    grad_as = [as_dtype(v, a.dtype) for v, a in zip(out[0].unbind(0), lora_as, strict=True)]
    return grad_as, *(list(v.unbind(0)) for v in out[1:])
