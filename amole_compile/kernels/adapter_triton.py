"""Triton kernels for the AdaMoLE op and their launchers; `adapter_torch.py` is the ground truth they match.

Legend: T tokens, D in dims, O out dims, E experts, R rank, K = E * R, Er router rows (E + 1 adamole, E mole,
0 lora). Padded: E_P = pow2(E), R_P = pow2(R) (so K_P = E_P * R_P >= 16), G_P = max(16, pow2(Er)).
Expert e's rank-r row sits at padded row e * R_P + r, so a [BT, K_P] tile reshapes to [BT, E_P, R_P].

forward   _fwd_kernel         x·[A; Wg; wt]ᵀ in one pass over x (dropout applied to the A part only), then the
                              routing epilogue -> za, h = scale·w·za, zr, scores, mask, and (HAS_AUX) the block's
                              column sums of mask·E/T² and scores.   out = base + h Bᵀ (addmm); the aux loss is
                              the dot of the summed column sums (2 ATen launches, docs in `adapter_torch.py`)
backward  _bwd_route_kernel   grad_h = grad_out·B, recomputed routing, -> grad_za, grad_zr, grad of the threshold bias
                              (the scores' gradient plus, HAS_AUX, the aux loss's: grad_aux·E/T²·sum_t mask)
          _bwd_weight_kernel  grad_A = grad_zaᵀ·xd and grad_[Wg; wt] = grad_zrᵀ·x in one pass over x (split over T,
                              and over K in chunks of BK columns when K_P is large)
          _bwd_input_kernel   grad_x = (grad_za·A)·mask + grad_zr·[Wg; wt]
          grad_B = grad_outᵀ·h (GEMM)
No per-expert copies of activations are saved: the op saves x, the dropout mask, za [T, K] and zr [T, Er].
The launchers only call torch ops and Triton kernels, so `torch.compile` can see through them: under tracing
(fake tensors, torch.compile, make_fx) kernels go through `wrap_triton`; in eager mode they launch directly, since
`wrap_triton`'s higher-order-op dispatch costs more host time per launch than the kernels take on a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .adapter_torch import adapter_backward_torch, adapter_torch, no_aux, up_project, wants_aux
from .backend import traced
from .blocks import Blocks, choose, padded_columns
from .methods import method_spec
from .routing_triton import ADAMOLE_CODE, LORA_CODE, gate_and_threshold, route, route_backward


@triton.jit
def _ld(ptr, mask, UPCAST: tl.constexpr):
    """Load (zeros where masked); UPCAST turns bfloat16 into float32 at once (Triton's interpreter has no bf16
    arithmetic, so CI runs the bf16 path this way; on a GPU UPCAST is off and bf16 feeds the tensor cores)."""
    v = tl.load(ptr, mask=mask, other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    return v


@triton.jit
def _router_ptrs(g_ptr, t_ptr, gp, D, NG, ER):
    """The router's rows read unpadded, as row pointers [G_P] and their mask: rows < NG of the gate [NG, D], row NG
    (when ER > NG) the threshold weight [1, D], nothing beyond. Made once per program; each D chunk is then one
    load `_ld(rows[:, None] + rd[None, :], ok[:, None] & (rd[None, :] < D))`: no stacked, padded copy of the router
    is made per call."""
    return tl.where(gp < NG, g_ptr + gp * D, t_ptr), gp < ER


@triton.jit
def _pad_cols(E, R, E_P: tl.constexpr, R_P: tl.constexpr, start=0, BK: tl.constexpr = 0):
    """Padded columns [start, start + BK) (all E_P * R_P when BK is 0) -> (real column in [0, K), valid)."""
    if BK == 0:
        kp = tl.arange(0, E_P * R_P)
    else:
        kp = start + tl.arange(0, BK)
    e, r = kp // R_P, kp % R_P
    return e * R + r, (e < E) & (r < R)


@triton.jit
def _fwd_kernel(x_ptr, keep_ptr, a_ptr, rw_ptr, thr_b_ptr, za_ptr, h_ptr, zr_ptr, scores_ptr, sel_ptr, parts_ptr,
                T, D, E, R, ER, scale, cap, drop_scale, aux_scale,
                METHOD: tl.constexpr, TOP_K: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_AUX: tl.constexpr,
                PRECISION: tl.constexpr,
                UPCAST: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, E_P: tl.constexpr, R_P: tl.constexpr,
                G_P: tl.constexpr):
    rt = tl.program_id(0) * BT + tl.arange(0, BT)
    kp = tl.arange(0, E_P * R_P)
    gp = tl.arange(0, G_P)
    acc_a = tl.zeros((BT, E_P * R_P), dtype=tl.float32)  # [BT, K_P]
    acc_r = tl.zeros((BT, G_P), dtype=tl.float32)  # [BT, G_P]
    for d0 in range(0, D, BD):
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


@triton.jit
def _bwd_route_kernel(go_ptr, b_ptr, za_ptr, zr_ptr, thr_b_ptr, gs_ptr, gaux_ptr, sums_ptr, gza_ptr, gzr_ptr, h_ptr,
                      gtb_ptr, T, N_OUT, E, R, ER, scale, cap,
                      METHOD: tl.constexpr, TOP_K: tl.constexpr, HAS_GS: tl.constexpr, HAS_AUX: tl.constexpr,
                      PRECISION: tl.constexpr,
                      UPCAST: tl.constexpr, BT: tl.constexpr, BO: tl.constexpr, E_P: tl.constexpr,
                      R_P: tl.constexpr, G_P: tl.constexpr):
    pid = tl.program_id(0)
    rt = pid * BT + tl.arange(0, BT)
    kp = tl.arange(0, E_P * R_P)
    acc = tl.zeros((BT, E_P * R_P), dtype=tl.float32)  # grad_h [BT, K_P]
    for o0 in range(0, N_OUT, BO):
        ro = o0 + tl.arange(0, BO)
        go = _ld(go_ptr + rt[:, None] * N_OUT + ro[None, :], (rt[:, None] < T) & (ro[None, :] < N_OUT), UPCAST)
        b = _ld(b_ptr + ro[:, None] * (E_P * R_P) + kp[None, :], ro[:, None] < N_OUT, UPCAST)  # [BO, K_P]
        acc += tl.dot(go, b, input_precision=PRECISION)
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


# ---- launchers ------------------------------------------------------------------------------------------------

def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) (`triton.cdiv` is a constexpr function: ~10x the host time per call)."""
    return -(-a // b)


# When a list (`aot.record_launches()`), launches are appended to it instead of run, with the GPU's modes
# (no bf16 upcast): how the AOT compile matrix gets the exact specialisations the launchers produce.
_recorder: list | None = None


def _launch(kernel, grid: tuple, args: tuple, consts: dict, blocks, wrap: bool) -> None:
    """Run `kernel` over `grid` (positional runtime args, keyword constexprs) with `blocks`' warps and stages;
    `wrap`: the call is being traced (`backend.traced`, asked once per op call), so launch via `wrap_triton`."""
    if _recorder is not None:
        _recorder.append((kernel, grid, args, consts, blocks))
        return
    fn = wrap_triton(kernel) if wrap else kernel
    fn[grid](*args, **consts, num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _geometry(e: int, r: int, er: int) -> dict[str, int]:
    e_p = 1 << max(0, (e - 1).bit_length())
    return {"E_P": e_p, "R_P": padded_columns(e, r) // e_p, "G_P": max(16, 1 << max(0, (max(er, 1) - 1).bit_length()))}


def _padded(w: torch.Tensor, e: int, r: int, geo: dict, rows: bool) -> torch.Tensor:
    """A [K, D] (rows) or B [O, K] -> padded to K_P rows / columns, expert e's at e * R_P; w itself (no copy)
    when K = K_P, as with E and R powers of two and E * R >= 16."""
    if (geo["E_P"], geo["R_P"]) == (e, r):
        return w.contiguous()
    pad = torch.nn.functional.pad
    if rows:  # [E*R, D] -> [E_P*R_P, D]
        return pad(w.reshape(e, r, -1), (0, 0, 0, geo["R_P"] - r, 0, geo["E_P"] - e)).reshape(-1, w.shape[-1])
    return pad(w.reshape(w.shape[0], e, r), (0, geo["R_P"] - r, 0, geo["E_P"] - e)).reshape(w.shape[0], -1)


def _weights(x, lora_a, gate_w, thr_w, thr_b, e: int, r: int, geo: dict) -> tuple:
    """(A padded [K_P, D], Wg [NG, D], wt [1, D], bt, NG) as the kernels read them, in x's dtype (a no-op when
    they are already): the router unpadded (`_router_ptrs`); x stands in for an absent tensor (never read)."""
    def own(w):
        return x if w is None else w.to(x.dtype).contiguous()

    n_gate = 0 if gate_w is None else gate_w.shape[0]
    return (_padded(lora_a.to(x.dtype), e, r, geo, rows=True), own(gate_w), own(thr_w), x if thr_b is None else thr_b,
            n_gate)


def _stacked_router(x, gate_w, thr_w, geo: dict) -> torch.Tensor:
    """[Wg; wt] stacked and zero-padded to [G_P, D] in x's dtype, as the forward kernel reads it (2 launches). The
    forward reads it padded: reading the rows unpadded (`_router_ptrs`) left 16 B stacks in the fp32 forward's AOT
    builds at K_P 64 (sm_90, 128 registers), where the backward's input kernel fits."""
    parts = [w for w in (gate_w, thr_w) if w is not None]
    rw = torch.cat(parts, 0) if parts else x.new_zeros(0, x.shape[1])  # [Er, D]
    return torch.nn.functional.pad(rw.to(x.dtype), (0, 0, 0, geo["G_P"] - rw.shape[0]))  # [G_P, D]


def _modes(dtype: torch.dtype) -> dict:
    """tl.dot input precision and UPCAST: exact fp32 dots; bf16 upcast to fp32 under Triton's interpreter."""
    upcast = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1" and _recorder is None
    return {"PRECISION": "ieee" if dtype == torch.float32 or upcast else "tf32", "UPCAST": upcast}


def _er(method: str, e: int) -> int:
    return method_spec(method).router_rows(e)


def _keep(drop_mask, x):
    """The dropout keep-mask as the kernels read it (bool, loaded as int1), or a placeholder pointer."""
    return (drop_mask.contiguous(), True) if drop_mask is not None else (x, False)


def adapter_triton(x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, base, method, num_experts, top_k, scale,
                   max_threshold, drop_scale, with_aux=False):
    """Triton forward with the same contract as `adapter_torch.adapter_torch`."""
    t, d = x.shape
    if t == 0:
        return adapter_torch(x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, base, method, num_experts,
                             top_k, scale, max_threshold, drop_scale, with_aux)
    e, k = num_experts, lora_a.shape[0]
    r, er = k // e, _er(method, e)
    geo = _geometry(e, r, er)
    x = x.contiguous()
    za, h = x.new_empty(t, k), x.new_empty(t, k)
    zr = x.new_empty(t, max(er, 1), dtype=torch.float32)
    scores = x.new_empty(t, e, dtype=torch.float32)
    sel = x.new_empty(t, e, dtype=torch.int8)
    keep, has_keep = _keep(drop_mask, x)
    blk = choose("fwd", geo["E_P"] * geo["R_P"], x.dtype)
    n_t, has_aux = _cdiv(t, blk.bt), wants_aux(with_aux, gate_w, t)
    parts = x.new_empty(n_t if has_aux else 0, 2, e, dtype=torch.float32)  # [blocks, 2, E] column sums
    a, _, _, tb, _ = _weights(x, lora_a, gate_w, thr_w, thr_b, e, r, geo)
    _launch(_fwd_kernel, (n_t,),
            (x, keep, a, _stacked_router(x, gate_w, thr_w, geo), tb, za, h, zr, scores, sel,
             parts if has_aux else scores, t, d, e, r, er, scale, max_threshold, drop_scale, e / (t * t)),
            dict(METHOD=method_spec(method).code, TOP_K=max(top_k, 1), HAS_KEEP=has_keep, HAS_AUX=has_aux,
                 **_modes(x.dtype), BT=blk.bt, BD=blk.bd, **geo), blk, traced(x))
    aux = no_aux(x)
    if has_aux:
        sums = parts.sum(0)  # [2, E]
        aux = torch.dot(sums[0], sums[1]), sums
    # sel holds 0 / 1: viewed as bool, no cast
    return up_project(h, lora_b, base), scores, sel.view(torch.bool), za, zr[:, :er], *aux


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
    r, er, o = k // e, _er(method, e), lora_b.shape[0]
    geo = _geometry(e, r, er)
    k_p = geo["E_P"] * geo["R_P"]
    x, grad_out, wrap = x.contiguous(), grad_out.contiguous(), traced(x)
    a, g, tw, thr_bias, n_gate = _weights(x, lora_a, gate_w, thr_w, thr_b, e, r, geo)
    blk = choose("bwd_route", k_p, x.dtype)
    n_t = _cdiv(t, blk.bt)
    gza, h = x.new_empty(t, k), x.new_empty(t, k)
    gzr = x.new_empty(t, max(er, 1))
    gtb = x.new_empty(n_t, dtype=torch.float32)  # the threshold bias's gradient per block of tokens
    zr = zr.contiguous() if er else gtb  # (LoRA: a float32 placeholder, never read)
    gs = grad_scores.contiguous() if grad_scores is not None else zr
    has_aux = grad_aux is not None and aux_sums is not None and aux_sums.numel() > 0 and er > 0
    _launch(_bwd_route_kernel, (n_t,),
            (grad_out, _padded(lora_b.to(x.dtype), e, r, geo, rows=False), za.contiguous(), zr, thr_bias, gs,
             grad_aux if has_aux else zr, aux_sums if has_aux else zr, gza, gzr, h, gtb, t, o, e, r, er, scale,
             max_threshold),
            dict(METHOD=method_spec(method).code, TOP_K=max(top_k, 1), HAS_GS=grad_scores is not None,
                 HAS_AUX=has_aux, **_modes(x.dtype), BT=blk.bt, BO=blk.bd, **geo), blk, wrap)
    grad_b = grad_out.t() @ h  # [O, K]
    grads = _weight_grads(gza, gzr, gtb if thr_b is not None else None, x, drop_mask, lora_a, gate_w, thr_w, e, r,
                          er, drop_scale, geo, wrap)
    grad_x = x.new_empty(0)
    if need_grad_x:
        grad_x = x.new_empty(t, d)
        keep, has_keep = _keep(drop_mask, x)
        blk = choose("bwd_input", k_p, x.dtype)
        _launch(_bwd_input_kernel, (_cdiv(t, blk.bt), _cdiv(d, blk.bd)),
                (gza, gzr, a, g, tw, keep, grad_x, t, d, e, r, n_gate, er, drop_scale),
                dict(HAS_KEEP=has_keep, **_modes(x.dtype), BT=blk.bt, BD=blk.bd, **geo), blk, wrap)
    grad_a, grad_gate, grad_thr_w, grad_tb = grads
    return grad_x, grad_a, grad_b.to(lora_b.dtype), grad_gate, grad_thr_w, grad_tb


# Programs a launch should have at least, where the work allows: two per SM of an H100 (132 SMs).
MIN_PROGRAMS = 264


def _t_split(t: int, blk: Blocks, programs: int) -> tuple[int, int]:
    """How many T splits the weight-gradient kernel sums over, and the rows of each (a multiple of BT): at least
    `blk.split_t`, and enough that `programs` per split reach MIN_PROGRAMS, up to one BT block per split."""
    want = max(blk.split_t, _cdiv(MIN_PROGRAMS, programs))
    rows = max(blk.bt, t // want // blk.bt * blk.bt)
    return _cdiv(t, rows), rows


def _reduce_blocks(n: int) -> Blocks:
    """_bwd_reduce_kernel over n elements: 256 per program, fewer (down to 32) until the grid has MIN_PROGRAMS."""
    block = 256
    while block > 32 and _cdiv(n, block) < MIN_PROGRAMS:
        block //= 2
    return Blocks(1, block, num_warps=max(1, block // 64), num_stages=1)


def _weight_grads(gza, gzr, gtb, x, drop_mask, lora_a, gate_w, thr_w, e, r, er, drop_scale, geo, wrap):
    """-> (grad_A [K, D] in A's dtype, grad_Wg [E, D], grad_wt [1, D], grad_bt [1]; in x's dtype, [0, ...] when
    absent): float32 partial sums over T splits (`_bwd_weight_kernel`), then summed (`_bwd_reduce_kernel`, which
    also sums the threshold bias's per-block partials `gtb`)."""
    t, d = x.shape
    k = e * r
    blk = choose("bwd_weight", geo["E_P"] * geo["R_P"], x.dtype)
    k_p = geo["E_P"] * geo["R_P"]
    bk = min(blk.bk or k_p, k_p)
    split, rows = _t_split(t, blk, _cdiv(d, blk.bd) * (k_p // bk))
    ga = x.new_empty(split, k, d, dtype=torch.float32)
    gr = x.new_empty(split, max(er, 1), d, dtype=torch.float32)
    keep, has_keep = _keep(drop_mask, x)
    _launch(_bwd_weight_kernel, (_cdiv(d, blk.bd), split, k_p // bk),
            (gza, gzr, x, keep, ga, gr, t, d, e, r, er, drop_scale, rows),
            dict(HAS_KEEP=has_keep, **_modes(x.dtype), BT=blk.bt, BD=blk.bd, BK=bk, **geo), blk, wrap)
    out = (x.new_empty(k, d, dtype=lora_a.dtype), x.new_empty(0 if gate_w is None else gate_w.shape[0], d),
           x.new_empty(0 if thr_w is None else 1, d), x.new_empty(0 if gtb is None else 1))
    n_gate = out[1].shape[0]
    red = _reduce_blocks((k + er) * d)
    _launch(_bwd_reduce_kernel, (_cdiv((k + er) * d, red.bd),),
            (ga, gr, ga if gtb is None else gtb, *(v if v.numel() else ga for v in out), split, k * d, n_gate * d,
             er * d, max(er, 1) * d, 0 if gtb is None else gtb.numel()),
            dict(BLOCK=red.bd), red, wrap)
    return out
