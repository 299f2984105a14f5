"""Triton kernels of the AdaMoLE op's forward, and the launchers; `adapter_torch.py` is the ground truth they
match. The backward's kernels are in `adapter_triton_bwd.py`, what both share in `triton_common.py` (legend there).

The launchers take a group of G sites (`adapter_triton_group`): sites that share x [T, D] and the op's scalars
(method, E, top-k, scale, cap, dropout scale, aux, dtype; so K) with parameters of their own (A_g, B_g [O_g, K]
with O_g free, router, dropout mask), such as the q, k and v projections of one attention input, computed in the
same launches (issue 21: host time per launch). `adapter_triton` is the group of one. Stacked: [G, ...].
The kernels' GROUPED constexpr (G > 1) keeps the site index out of one site's builds (the constant 0 there: the
code as before the groups, whose AOT builds had no spills; the group arithmetic made ptxas leave 8-32 B stacks in
some of them).

forward   _fwd_kernel         program (T block, D split, site g): x·[A_g; Wg_g; wt_g]ᵀ over its columns of D
                              (site g's dropout applied to the A part only) -> float32 partial sums
                              [G, S, T, K_P] and [G, S, T, G_P]
          _fwd_finish_kernel  program (T block, site g): the S partials summed, then the routing epilogue -> za,
                              h = scale·w·za, zr, scores, mask, and (HAS_AUX) the block's column sums of mask·E/T²
                              and scores
          out_g = base_g + h_g B_gᵀ (an addmm per site); the aux losses are the per-site dots of the summed
          column sums (2 ATen launches for all sites)
Site g's A and router rows are one `cat` for all sites ([A_g padded; Wg_g; wt_g; 0] per site; for one site A
itself, no copy, and the router's `cat`), the threshold biases another (G > 1).
The split over D keeps the grid at >= MIN_PROGRAMS programs over all sites however few the tokens (one program per
64 tokens left an H100 mostly idle at T = 1024); the finishing kernel takes FINISH_BT tokens per program.
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
from .adapter_triton_bwd import adapter_backward_triton, adapter_backward_triton_group  # noqa: F401  (both directions)
from .backend import traced
from .plans import forward_plan
from .routing_triton import gate_and_threshold, route
from .triton_common import _ld, _pad_cols, _sum_splits, as_dtype, keep_arg, launch, padded, stacked_bias, upcast


@triton.jit
def _fwd_kernel(x_ptr, keep_ptr, a_ptr, rw_ptr, wsa_ptr, wsr_ptr, T, D, drop_scale, d_per, S, W_ROWS,
                HAS_KEEP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BT: tl.constexpr,
                BD: tl.constexpr, K_P: tl.constexpr, G_P: tl.constexpr, GROUPED: tl.constexpr):
    """Program (T block, D split of d_per columns, site g) -> its partial sums wsa [G, S, T, K_P],
    wsr [G, S, T, G_P]; site g's A and router rows are W_ROWS rows after site g - 1's, its dropout mask rows
    g·T + t of the stacked [G·T, D]. Rows in 32 bits (G·T·D and G·S·T·K_P < 2³¹, as `_bwd_route_finish_kernel`):
    64-bit pointers bumped per site left 8-32 B stacks in the AOT builds."""
    pid_t, pid_s, g = tl.program_id(0), tl.program_id(1), tl.program_id(2) * GROUPED
    rt = pid_t * BT + tl.arange(0, BT)
    rk = g * T + rt  # site g's mask rows
    kp = g * W_ROWS + tl.arange(0, K_P)  # site g's A rows
    gp = g * W_ROWS + tl.arange(0, G_P)  # and router rows
    acc_a = tl.zeros((BT, K_P), dtype=tl.float32)  # [BT, K_P]
    acc_r = tl.zeros((BT, G_P), dtype=tl.float32)  # [BT, G_P]
    d_start = pid_s * d_per
    for d0 in range(d_start, d_start + d_per, BD):
        rd = d0 + tl.arange(0, BD)
        io = (rt[:, None] < T) & (rd[None, :] < D)
        x = _ld(x_ptr + rt[:, None] * D + rd[None, :], io, UPCAST)  # [BT, BD]
        a = _ld(a_ptr + kp[:, None] * D + rd[None, :], rd[None, :] < D, UPCAST)  # [K_P, BD]
        r = _ld(rw_ptr + gp[:, None] * D + rd[None, :], rd[None, :] < D, UPCAST)  # [G_P, BD]
        acc_r += tl.dot(x, tl.trans(r), input_precision=PRECISION)
        if HAS_KEEP:
            keep = tl.load(keep_ptr + rk[:, None] * D + rd[None, :], mask=io, other=0)
            x = tl.where(keep != 0, x * drop_scale, 0.0).to(x.dtype)
        acc_a += tl.dot(x, tl.trans(a), input_precision=PRECISION)
    row = (g * S + pid_s) * T + rt[:, None]  # the workspaces' [G * S * T] rows
    tl.store(wsa_ptr + row * K_P + tl.arange(0, K_P)[None, :], acc_a, mask=rt[:, None] < T)
    tl.store(wsr_ptr + row * G_P + tl.arange(0, G_P)[None, :], acc_r, mask=rt[:, None] < T)


@triton.jit
def _fwd_finish_kernel(wsa_ptr, wsr_ptr, thr_b_ptr, za_ptr, h_ptr, zr_ptr, scores_ptr, sel_ptr, parts_ptr,
                       T, E, R, ER, S, THR_GS, scale, cap, aux_scale,
                       METHOD: tl.constexpr, TOP_K: tl.constexpr, HAS_AUX: tl.constexpr, BT: tl.constexpr,
                       E_P: tl.constexpr, R_P: tl.constexpr, G_P: tl.constexpr, GROUPED: tl.constexpr):
    """Program (BT tokens, site g): the partial sums over the D splits, then the routing epilogue; every output
    stacked [G, ...], site g's rows g·T + t in 32 bits (G·T·K < 2³¹; as `_bwd_route_finish_kernel`); the threshold
    bias at thr_b_ptr + g * THR_GS (0: one placeholder for all)."""
    pid, g = tl.program_id(0), tl.program_id(1) * GROUPED
    rt = pid * BT + tl.arange(0, BT)
    rows = g * T + rt
    gp = tl.arange(0, G_P)
    site = g.to(tl.int64) * S * T
    acc_a = _sum_splits(wsa_ptr + site * (E_P * R_P), S, T, rt, E_P * R_P, BT)  # [BT, K_P]
    acc_r = _sum_splits(wsr_ptr + site * G_P, S, T, rt, G_P, BT)  # [BT, G_P]
    thr_b = tl.load(thr_b_ptr + g * THR_GS).to(tl.float32)
    logits, u = gate_and_threshold(acc_r, thr_b, E, BT, E_P, G_P)
    w, scores, m, _, _, _ = route(logits, u, cap, E, METHOD, TOP_K, E_P)
    h = tl.reshape(tl.reshape(acc_a, (BT, E_P, R_P)) * (scale * w)[:, :, None], (BT, E_P * R_P))
    col, ok = _pad_cols(E, R, E_P, R_P)
    out = (rt[:, None] < T) & ok[None, :]
    tl.store(za_ptr + rows[:, None] * (E * R) + col[None, :], acc_a.to(za_ptr.dtype.element_ty), mask=out)
    tl.store(h_ptr + rows[:, None] * (E * R) + col[None, :], h.to(h_ptr.dtype.element_ty), mask=out)
    tl.store(zr_ptr + rows[:, None] * ER + gp[None, :], acc_r, mask=(rt[:, None] < T) & (gp[None, :] < ER))
    ecol = tl.arange(0, E_P)
    eo = (rt[:, None] < T) & (ecol[None, :] < E)
    tl.store(scores_ptr + rows[:, None] * E + ecol[None, :], scores, mask=eo)
    tl.store(sel_ptr + rows[:, None] * E + ecol[None, :], m.to(tl.int8), mask=eo)
    if HAS_AUX:  # this block's column sums [E]: of mask·E/T² (row 0) and of scores (row 1), parts [G, blocks, 2, E]
        part = parts_ptr + (g * tl.num_programs(0) + pid) * 2 * E + ecol
        tl.store(part, tl.sum(tl.where(eo & m, aux_scale, 0.0), axis=0), mask=ecol < E)
        tl.store(part + E, tl.sum(tl.where(eo, scores, 0.0), axis=0), mask=ecol < E)


_ZERO_ROWS: dict = {}  # (device, dtype, rows, D) -> zeros: the router's padding rows, made once


def _zero_rows(x, n: int, wrap: bool) -> torch.Tensor:
    """n zero rows [n, D] in x's dtype: made once and cached (a traced call makes its own: no cached tensor in a
    graph)."""
    if wrap:
        return x.new_zeros(n, x.shape[1])
    key = (x.device, x.dtype, n, x.shape[1])
    zeros = _ZERO_ROWS.get(key)
    if zeros is None:
        zeros = _ZERO_ROWS[key] = x.new_zeros(n, x.shape[1])
    return zeros


def _router_rows(x, gate_w, thr_w) -> list:
    """[Wg, wt] as present, in x's dtype."""
    return [as_dtype(w, x.dtype) for w in (gate_w, thr_w) if w is not None]


def _stacked_router(x, gate_w, thr_w, g_p: int, wrap: bool) -> torch.Tensor:
    """[Wg; wt; 0] [G_P, D] in x's dtype, as the forward kernel reads it: one `cat` with cached zero rows (a traced
    call pads instead: no cached tensor in a graph). The forward reads the router padded: reading its rows
    unpadded (`_router_ptrs`, as the input-gradient kernel does) spilled registers in the AOT builds (a 32 B stack
    at 255 registers, bf16 K_P 256 on sm_90)."""
    parts = _router_rows(x, gate_w, thr_w)
    n_pad = g_p - sum(w.shape[0] for w in parts)
    if wrap:
        return torch.nn.functional.pad(router_weight(gate_w, thr_w, x).to(x.dtype), (0, 0, 0, n_pad))
    zeros = _zero_rows(x, n_pad, False)
    return torch.cat([*parts, zeros], 0) if parts else zeros


def _stacked_weights(x, lora_as, gate_ws, thr_ws, p, e: int, wrap: bool) -> tuple:
    """-> (A rows, router rows [G_P, D], W_ROWS): what `_fwd_kernel` reads for site g at W_ROWS * g rows past
    each pointer. One site: A padded [K_P, D] (A itself when K = K_P) and `_stacked_router`. G sites: one `cat`
    of [A_g padded; Wg_g; wt_g; 0] [G * (K_P + G_P), D] for all of them, both pointers into it."""
    if len(lora_as) == 1:
        a = padded(as_dtype(lora_as[0], x.dtype), e, p.r, p.geo, rows=True)  # [K_P, D]
        return a, _stacked_router(x, gate_ws[0], thr_ws[0], p.g_p, wrap), 0
    zeros = _zero_rows(x, p.g_p - p.er, wrap)
    rows = []
    for a, gate_w, thr_w in zip(lora_as, gate_ws, thr_ws, strict=True):
        rows += [padded(as_dtype(a, x.dtype), e, p.r, p.geo, rows=True), *_router_rows(x, gate_w, thr_w), zeros]
    stacked = torch.cat(rows, 0)  # [G * (K_P + G_P), D]
    return stacked, stacked[p.k_p:], p.k_p + p.g_p


def _aux(parts, p, x) -> tuple:
    """The aux loss of every site from the finishing kernel's column sums parts [G, blocks, 2, E] -> (aux [G],
    aux_sums [G, 2, E]): per site the dot of the summed rows (one batched product for all sites: a site's aux
    is the same bit for bit whether it runs alone or linked)."""
    if not p.has_aux:
        return no_aux(x)
    sums = parts.sum(1)  # [G, 2, E]
    return torch.bmm(sums[:, :1], sums[:, 1:].transpose(1, 2)).view(-1), sums


def adapter_triton_group(x, drop_masks, lora_as, lora_bs, gate_ws, thr_ws, thr_bs, bases, method, num_experts,
                         top_k, scale, max_threshold, drop_scale, with_aux=False, wrap=None, own_base=False):
    """Triton forward of G sites sharing x [T, D] and the op's scalars, each with its own parameters: per site
    the contract of `adapter_torch.adapter_torch`, in two Triton launches for all sites. drop_masks [G, T, D] bool
    or None; lora_as, lora_bs, gate_ws, thr_ws, thr_bs, bases: G tensors each (gate, threshold and base entries
    None alike across the sites) -> (outs: G tensors [T, O_g], base_g + h_g B_gᵀ (added into base_g when
    `own_base`), scores [G, T, E] f32, mask [G, T, E] bool, za [G, T, K], zr [G, T, Er] f32, aux [G], aux_sums
    [G, 2, E] (both empty without the aux loss)); `wrap`: the call is traced (`backend.traced(x)` when None)."""
    t, d = x.shape
    n = len(lora_as)
    if t == 0:
        return _group_torch(x, drop_masks, lora_as, lora_bs, gate_ws, thr_ws, thr_bs, bases, method, num_experts,
                            top_k, scale, max_threshold, drop_scale, with_aux, own_base)
    x = x.contiguous()
    wrap = traced(x) if wrap is None else wrap
    keep, has_keep = keep_arg(drop_masks, x)
    p = forward_plan(t, d, num_experts, lora_as[0].shape[0], method, top_k, x.dtype, has_keep,
                     wants_aux(with_aux, gate_ws[0], t), upcast(x.dtype), blocks.choose, n)
    blocks.check_index(t, d, max(b.shape[0] for b in lora_bs), n, p.k_p)
    f32 = torch.float32
    wsa = x.new_empty(n, p.splits, t, p.k_p, dtype=f32)  # [G, S, T, K_P] partial sums over D
    wsr = x.new_empty(n, p.splits, t, p.g_p, dtype=f32)  # [G, S, T, G_P]
    a, rw, w_rows = _stacked_weights(x, lora_as, gate_ws, thr_ws, p, num_experts, wrap)
    launch(_fwd_kernel, p.main, (x, keep, a, rw, wsa, wsr, t, d, drop_scale, p.per, p.splits, w_rows), wrap)
    k = lora_as[0].shape[0]
    za, h = x.new_empty(n, t, k), x.new_empty(n, t, k)
    zr = x.new_empty(n, t, max(p.er, 1), dtype=f32)
    scores = x.new_empty(n, t, num_experts, dtype=f32)
    sel = x.new_empty(n, t, num_experts, dtype=torch.int8)
    parts = x.new_empty(n, p.n_f, 2, num_experts, dtype=f32) if p.has_aux else scores  # [G, blocks, 2, E]
    thr_b, thr_gs = stacked_bias(thr_bs, x)
    launch(_fwd_finish_kernel, p.finish,
           (wsa, wsr, thr_b, za, h, zr, scores, sel, parts, t, num_experts, p.r, p.er, p.splits, thr_gs, scale,
            max_threshold, p.aux_scale), wrap)
    outs = [up_project(h[i], lora_bs[i], bases[i], own_base) for i in range(n)]
    # sel holds 0 / 1: viewed as bool, no cast
    return outs, scores, sel.view(torch.bool), za, zr[:, :, :p.er], *_aux(parts, p, x)


def _group_torch(x, drop_masks, lora_as, lora_bs, gate_ws, thr_ws, thr_bs, bases, method, num_experts, top_k,
                 scale, max_threshold, drop_scale, with_aux, own_base):
    """`adapter_triton_group`'s results from the torch path, site by site (no tokens: nothing to launch)."""
    sites = [adapter_torch(x, None if drop_masks is None else drop_masks[i], lora_as[i], lora_bs[i], gate_ws[i],
                           thr_ws[i], thr_bs[i], bases[i], method, num_experts, top_k, scale, max_threshold,
                           drop_scale, with_aux, own_base) for i in range(len(lora_as))]
    outs, *rest = zip(*sites, strict=True)
    return [list(outs), *(torch.stack(v) for v in rest)]


def adapter_triton(x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, base, method, num_experts, top_k, scale,
                   max_threshold, drop_scale, with_aux=False, wrap=None, own_base=False):
    """Triton forward with the same contract as `adapter_torch.adapter_torch` (`own_base` too); `wrap`: the call
    is traced (`backend.traced(x)` when None). One site of `adapter_triton_group` (its stacked results viewed)."""
    if x.shape[0] == 0:
        return adapter_torch(x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, base, method, num_experts,
                             top_k, scale, max_threshold, drop_scale, with_aux, own_base)
    outs, scores, mask, za, zr, aux, sums = adapter_triton_group(
        x, None if drop_mask is None else drop_mask.unsqueeze(0), (lora_a,), (lora_b,), (gate_w,), (thr_w,),
        (thr_b,), (base,), method, num_experts, top_k, scale, max_threshold, drop_scale, with_aux, wrap, own_base)
    if aux.numel():
        aux, sums = aux[0], sums[0]
    return outs[0], scores[0], mask[0], za[0], zr[0], aux, sums
