"""What the Triton kernels of the op share: device helpers (loads, padded columns, the router's rows), and the
launchers' plumbing (launch or record, geometry, padding, modes, and the tiling that fills the GPU).

Legend: T tokens, D in dims, O out dims, E experts, R rank, K = E * R, Er router rows (E + 1 adamole, E mole,
0 lora). Padded: E_P = pow2(E), R_P = pow2(R) (so K_P = E_P * R_P >= 16), G_P = max(16, pow2(Er)).
Expert e's rank-r row sits at padded row e * R_P + r, so a [BT, K_P] tile reshapes to [BT, E_P, R_P].
"""

from __future__ import annotations

import functools
import os
from dataclasses import replace

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import blocks, direct
from .adapter_torch import as_dtype
from .blocks import Blocks, padded_columns
from .methods import method_spec

# Programs a launch should have at least, where the work allows: two per SM of an H100 (132 SMs).
MIN_PROGRAMS = 264
# Tokens per program of the finishing (routing) kernels, by K_P: no dot product there, so few tokens per program
# give cdiv(T, 4) programs (256 at T = 1024) and little register use. K_P 512 takes 2: at 4, ptxas left an 8 B
# stack in the forward's at E 8 R 64 on sm_80 (56 registers); at 2 everywhere, others elsewhere (AOT matrix,
# 2026-12-05: both rows below build without a stack on sm_80 and sm_90).
FINISH_BT = 4
FINISH_BT_BY_K_P = {512: 2}


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
def _sum_splits(ws_ptr, S, T, rt, N: tl.constexpr, BT: tl.constexpr):
    """The float32 partial sums ws [S, T, N] of rows rt, summed over the S splits -> [BT, N]."""
    cols = tl.arange(0, N)
    acc = tl.zeros((BT, N), dtype=tl.float32)
    for s in range(S):
        acc += tl.load(ws_ptr + (s * T + rt[:, None]) * N + cols[None, :], mask=rt[:, None] < T, other=0.0)
    return acc


# ---- launchers' plumbing -------------------------------------------------------------------------------------

def cdiv(a: int, b: int) -> int:
    """ceil(a / b) (`triton.cdiv` is a constexpr function: ~10x the host time per call)."""
    return -(-a // b)


# When a list (`aot.record_launches()`), launches are appended to it instead of run, with the GPU's modes
# (no bf16 upcast): how the AOT compile matrix gets the exact specialisations the launchers produce.
recorder: list | None = None


def launch(kernel, plan, args: tuple, wrap: bool) -> None:
    """Run `kernel` as `plan` (a `plans.Launch`: grid, constexprs, warps and stages) with positional runtime
    `args`; `wrap`: the call is being traced (`backend.traced`, asked once per op call), so launch via
    `wrap_triton`; otherwise through `direct` (no Triton Python dispatch once the build is known)."""
    if recorder is not None:
        recorder.append((kernel, plan.grid, args, plan.constexprs, plan.blk))
        return
    if wrap:
        wrap_triton(kernel)[plan.grid](*args, **plan.kwargs)
    elif direct.takes(kernel):
        direct.launch(kernel, plan, args)
    else:
        kernel[plan.grid](*args, **plan.kwargs)


def geometry(e: int, r: int, er: int) -> dict[str, int]:
    """The padded sizes the kernels take as constexprs: E_P, R_P (K_P = E_P * R_P) and G_P."""
    e_p = 1 << max(0, (e - 1).bit_length())
    return {"E_P": e_p, "R_P": padded_columns(e, r) // e_p, "G_P": max(16, 1 << max(0, (max(er, 1) - 1).bit_length()))}


def padded(w: torch.Tensor, e: int, r: int, geo: dict, rows: bool) -> torch.Tensor:
    """A [K, D] (rows) or B [O, K] -> padded to K_P rows / columns, expert e's at e * R_P; w itself (no copy)
    when K = K_P, as with E and R powers of two and E * R >= 16."""
    if (geo["E_P"], geo["R_P"]) == (e, r):
        return w.contiguous()
    pad = torch.nn.functional.pad
    if rows:  # [E*R, D] -> [E_P*R_P, D]
        return pad(w.reshape(e, r, -1), (0, 0, 0, geo["R_P"] - r, 0, geo["E_P"] - e)).reshape(-1, w.shape[-1])
    return pad(w.reshape(w.shape[0], e, r), (0, geo["R_P"] - r, 0, geo["E_P"] - e)).reshape(w.shape[0], -1)


def weights(x, lora_a, gate_w, thr_w, e: int, r: int, geo: dict) -> tuple:
    """(A padded [K_P, D], Wg [NG, D], wt [1, D]) as the kernels read them, in x's dtype (a no-op when they are
    already): the router unpadded (`_router_ptrs`); x stands in for an absent tensor (never read)."""
    def own(w):
        return x if w is None else as_dtype(w, x.dtype).contiguous()

    return padded(as_dtype(lora_a, x.dtype), e, r, geo, rows=True), own(gate_w), own(thr_w)


def stacked_bias(thr_bs, x) -> tuple:
    """The threshold biases as the finishing kernels read them -> (pointer, THR_GS): one bias [1] itself, G of them
    in one `cat` [G]; x as a placeholder (THR_GS 0) when there are none."""
    if thr_bs[0] is None:
        return x, 0
    return (thr_bs[0] if len(thr_bs) == 1 else torch.cat(list(thr_bs))), 1


def upcast(dtype: torch.dtype) -> bool:
    """UPCAST: bf16 loads upcast to fp32 under Triton's interpreter (it has no bf16 arithmetic); never for the
    AOT recorder, which records the GPU's specialisations."""
    return dtype == torch.bfloat16 and recorder is None and os.environ.get("TRITON_INTERPRET") == "1"


def router_rows(method: str, e: int) -> int:
    """Er: the router's rows for `method` with E experts."""
    return method_spec(method).router_rows(e)


def keep_arg(drop_mask, x):
    """The dropout keep-mask as the kernels read it (bool, loaded as int1), or a placeholder pointer."""
    return (drop_mask.contiguous(), True) if drop_mask is not None else (x, False)


def cache_sizes(maxsize: int):
    """`functools.lru_cache` for a pure function of sizes and flags, except a call with a `torch.SymInt` (a size
    traced symbolically, as under torch.compile(dynamic=True), is unhashable): that one is worked out uncached,
    keeping the size symbolic."""
    def wrap(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args):
            return fn(*args) if torch.SymInt in map(type, args) else cached(*args)

        call.cache_info, call.cache_clear = cached.cache_info, cached.cache_clear
        return call

    return wrap


@cache_sizes(maxsize=1024)  # pure; `dataclasses.replace` costs ~5 us a call
def few_tokens(blk: Blocks, programs: int) -> Blocks:
    """`blk` with 16 tokens per program when its grid (`programs` at blk.bt) is short of MIN_PROGRAMS: the two
    token widths the AOT matrix builds (the table's, and 16, the least a tl.dot takes)."""
    return replace(blk, bt=16) if programs < MIN_PROGRAMS and blk.bt > 16 else blk


def split_tiles(kernel: str, k_p: int, dtype: torch.dtype, t: int, span: int,
                choose=None, groups: int = 1) -> tuple[Blocks, int, int]:
    """Tiling of a kernel that sums over `span` (D or O) for T tokens of `groups` sites in one launch -> (blocks,
    splits S, columns per split): the table's tile (`blocks.choose`), 16 tokens per program when that grid is
    short, and the span split in S parts (partial sums, then a finishing kernel) until cdiv(T, BT) x S x groups
    reaches MIN_PROGRAMS, at least BD columns per part. `choose`: the tile table (default `blocks.choose`)."""
    blk = (choose or blocks.choose)(kernel, k_p, dtype)
    blk = few_tokens(blk, cdiv(t, blk.bt) * groups)
    n_t = cdiv(t, blk.bt)
    want = max(1, min(cdiv(MIN_PROGRAMS, n_t * groups), cdiv(span, blk.bd)))
    per = cdiv(cdiv(span, want), blk.bd) * blk.bd
    return blk, cdiv(span, per), per


@functools.lru_cache(maxsize=64)
def finish_blocks(k_p: int) -> Blocks:
    """The finishing kernels' launch: FINISH_BT tokens (FINISH_BT_BY_K_P), warps by the [BT, K_P] tile."""
    bt = FINISH_BT_BY_K_P.get(k_p, FINISH_BT)
    return Blocks(bt, 0, num_warps=1 if k_p <= 64 else 2 if k_p <= 256 else 4, num_stages=1)
