"""Block sizes and warps of the Triton kernels, per (kernel, K_P, dtype). Imports no triton.

Legend: K_P = E_P * R_P padded adapter columns (E_P = pow2(E), R_P = pow2(R), K_P >= 16); BT tokens per program,
BD the chunk of D (of O in the route-backward kernel), SPLIT_T partial sums over T in the weight-gradient kernel.
A row gives the largest tile; where its grid would be short of MIN_PROGRAMS, the launchers take 16 tokens per
program and split D or O (`triton_common.few_tokens`, `split_tiles`), and the AOT matrix builds both.
`TABLE` is what `benchmarks/kernel_resources.py --search` finds: for each row the first of `CANDIDATES` that
compiles for sm_80 and sm_90 without spilling registers and within the shared memory a block may opt into;
`benchmarks/kernel_resources.py` checks the whole matrix against it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

KERNEL_NAMES = ("fwd", "bwd_route", "bwd_weight", "bwd_input")
# Beyond these the op takes the torch path (`unsupported`): the AOT matrix covers E <= 16, R <= 64.
MAX_EXPERTS, MAX_K_P = 16, 1024


@dataclass(frozen=True)
class Blocks:
    """One launch configuration: BT tokens x BD columns of D (or O) per program, warps and pipeline stages."""

    bt: int
    bd: int
    num_warps: int = 4
    num_stages: int = 2
    split_t: int = 8  # bwd_weight only: partial sums over T
    bk: int = 0  # bwd_weight only: padded columns per program (0: all K_P in one program)


def dtype_class(dtype: torch.dtype) -> str:
    """'fp32' (tl.dot in exact fp32: FMA, operands held per thread) or '16bit' (bf16/fp16: tensor cores)."""
    return "fp32" if dtype == torch.float32 else "16bit"


# Candidates in order of preference (larger tiles first: fewer programs re-reading the weights, longer dots).
# fp32 dots run on FMA units with each thread holding a slice of both operands along the reduction, so register
# pressure grows with BD and the tile; more warps split the [BT, K_P] accumulator over more threads.
# bf16/fp16 dots run on tensor cores, whose operand layouts are compact: larger tiles fit.
_FP32 = (Blocks(32, 64, 4), Blocks(32, 32, 4), Blocks(32, 32, 8), Blocks(16, 32, 8), Blocks(16, 16, 8),
         Blocks(16, 16, 16))
_HALF = (Blocks(64, 64, 4), Blocks(32, 64, 4), Blocks(32, 32, 4), Blocks(16, 64, 8), Blocks(16, 32, 8),
         Blocks(16, 16, 8))
# The weight-gradient kernel can also split K_P over programs (its accumulator is [K_P, BD] and needs no routing).
_SPLIT_K = (Blocks(16, 32, 8, bk=256), Blocks(16, 16, 8, bk=128))
# Each tile is tried at 2 pipeline stages, then 3, then 1: ptxas sometimes parks a few values in a 8-16 B stack at
# 80-128 registers (not register pressure: its allocator's choice), and a different stage count, which changes
# the shape of the main loop, is the cheapest way around it that keeps the tile.
_STAGES = (2, 3, 1)
CANDIDATES = {(k, c): tuple(replace(b, num_stages=st)
                            for b in (_FP32 if c == "fp32" else _HALF) + (_SPLIT_K if k == "bwd_weight" else ())
                            for st in _STAGES)
              for k in KERNEL_NAMES for c in ("fp32", "16bit")}

DEFAULT = Blocks(32, 64, 4)

# (kernel, dtype class) -> ((largest K_P of the row, Blocks), ...) in increasing K_P. Each row is the first of
# CANDIDATES that `kernel_resources.py --search` found compiling without spills on sm_80 and sm_90 within their
# shared memory (triton 3.9, 2026-11-25; the rows with a stage count other than 2 on 2026-12-04, when the
# candidates gained stage variants and the search re-ran for the K_P that still left a stack); the comment says
# what the larger configurations before it ran into.
B = Blocks
TABLE: dict[tuple[str, str], tuple[tuple[int, Blocks], ...]] = {
    # x·[A; Wg; wt]ᵀ over a split of D (partial sums; the routing is the finishing kernel's); accumulator
    # [BT, K_P] fp32. Searched 2026-12-05 for the split kernel, over both token counts of `_aot.SHAPES` (the
    # table's tile, and 16 tokens per program): the stage counts and warps step around 8-16 B stacks ptxas leaves
    # Re-searched 2026-12-06 for K_P 16, 128 and 1024, whose grouped builds (G = 3 sites) left 8-16 B stacks
    ("fwd", "fp32"): (
        (16, B(32, 32, 8, num_stages=3)),  # BD 64 spills 80-104 B; 4 warps: 8-16 B stacks (one site or three)
        (32, B(32, 64, 4, num_stages=3)),  # 2 stages: 8 B stack
        (64, B(32, 32, 8)),  # BD 64 at 4 warps leaves 8-16 B stacks at every stage count
        (128, B(32, 32, 8, num_stages=1)),  # 4 warps, and 8 warps at 2-3 stages: 8-16 B stacks
        (256, B(32, 32, 4, num_stages=3)),
        (512, B(16, 16, 8)),
        (1024, B(16, 16, 8)),  # BD 32: 8 B stack in the grouped build on sm_80
    ),
    ("fwd", "16bit"): (
        (16, B(64, 64, 4, num_stages=1)),  # 2 and 3 stages: 8 B stack
        (32, B(64, 64, 4)),
        (64, B(64, 64, 4, num_stages=3)),  # 2 stages: 8 B stack
        (128, B(64, 64, 4, num_stages=1)),  # 2 / 3 stages: 16 / 8 B stacks in grouped builds (2026-12-06)
        (256, B(32, 64, 4)),  # BT 64 spills at K_P 256
        (512, B(16, 64, 8)),
        (1024, B(16, 32, 8)),  # BD 64 spills at K_P 1024
    ),
    # grad_h = grad_out·B over a split of O (partial sums; the routing backward is the finishing kernel's);
    # accumulator [BT, K_P] fp32; searched 2026-12-05 as the forward
    ("bwd_route", "fp32"): (
        (32, B(32, 64, 4)),
        (64, B(32, 64, 4, num_stages=1)),  # 2 stages: 8 B stack on sm_80 (lora R = 64)
        (128, B(32, 32, 4, num_stages=1)),  # BO 64 spills from K_P 128
        (256, B(32, 32, 4)),
        (512, B(32, 32, 8)),  # 4 warps spill at K_P 512
        (1024, B(16, 32, 8)),  # BT 32 spills even with 8 warps
    ),
    ("bwd_route", "16bit"): (
        (256, B(64, 64, 4)),
        (512, B(32, 64, 4)),  # BT 64 spills at K_P 512
        (1024, B(16, 64, 8)),
    ),
    # grad_A = grad_zaᵀ·xd over a T split; accumulator [K_P, BD] (or [BK, BD] with a K split)
    ("bwd_weight", "fp32"): (
        # BT 32 x BD 64 at 4 warps sits at 255 registers and spills (64-72 B at K_P 32 with E = 1, 2; KB from K_P
        # 64): the [K_P, BD] FMA accumulator over 8 warps, with 16 tokens per step
        (64, B(16, 32, 8)),
        # BT 16 leaves an 8 B stack on sm_90 at K_P 128 (adamole E 16, R 8); BT 32 at 8 warps and 1 stage fits
        (128, B(32, 32, 8, num_stages=1)),
        (256, B(16, 32, 8, num_stages=3)),  # 2 stages: 8 B stack in a grouped build on sm_80 (re-searched 2026-12-06)
        (512, B(16, 16, 8)),  # BD 32 spills at K_P 512
        # every whole-K configuration spills (400 B even at 16 warps): K in chunks of 128 (128 registers; chunks
        # of 256 fit too but at 249 registers, at the ceiling)
        (1024, B(16, 16, 8, bk=128)),
    ),
    ("bwd_weight", "16bit"): (
        (16, B(64, 64, 4, num_stages=1)),  # 2 and 3 stages leave an 8 B stack on sm_80 (mole E 16, R 1)
        (32, B(64, 64, 4)),
        (128, B(32, 64, 4)),  # BT 64 spills from K_P 64
        (256, B(32, 32, 4)),  # BD 64 spills at K_P 256
        # BT 32 spills at K_P 512; BD 64 sat at 255 registers and spilled 8 B on sm_80 (E 16, R 32, dropout) in the
        # full matrix; BD 16 fits at K_P 1024 (BD 32+ spills there), so it is used from K_P 512 (not re-compiled)
        (1024, B(16, 16, 8)),
    ),
    # grad_x = (grad_za·A)·mask + grad_zr·[Wg; wt]; one [K_P, BD] tile of A per program, no loop
    ("bwd_input", "fp32"): (
        (64, B(32, 32, 4)),  # BD 64 spills at K_P 16 and 64
        (512, B(32, 32, 8)),  # 4 warps spill from K_P 128 (10 KB at 512)
        (1024, B(16, 16, 8)),  # BD 32 needs 198 KB of shared memory (over the A100's 163 KB)
    ),
    ("bwd_input", "16bit"): (
        (512, B(64, 64, 4)),
        (1024, B(32, 32, 4)),  # the [K_P, 64] tile of A needs 270 KB (BT 64) / 203 KB (BT 32) of shared memory
    ),
}
del B


def padded_columns(num_experts: int, rank: int) -> int:
    """K_P = E_P * R_P: experts and rank rounded up to powers of two, at least 16 columns (tl.dot's minimum)."""
    e_p = 1 << max(0, (num_experts - 1).bit_length())
    r_p = max(1 << max(0, (rank - 1).bit_length()), -(-16 // e_p))
    return e_p * r_p


# dtype class -> ((largest K_P of the row, bytes), ...) in increasing K_P: the most shared memory per block that any
# build of the kernels takes for an op at that K_P (the AOT matrix over `TABLE`'s tiles, methods, E, R, dropout,
# one site and a group; the larger of sm_80's and sm_90's; sm_86 / sm_89 build as sm_80, or smaller). What
# `backend.device_unfit` holds a GPU's per-block opt-in against: a 99 KB GPU (sm_86 / sm_89 / sm_120) cannot run
# K_P 512 (fp32 and 16-bit) or 1024, where Triton would raise `OutOfResources` at the first launch. The AOT checks
# (`_aot.problems` with the build's spec) fail when a build takes more than its row says.
# Measured 2026-12-07 (triton 3.9; adamole E 1-16, R 1-64, with and without dropout): the largest are the
# input-gradient kernel's at K_P 512 and 1024, and the forward's or the route kernel's below.
SHARED_BYTES: dict[str, tuple[tuple[int, int], ...]] = {
    "fp32": ((16, 26624), (32, 53248), (64, 24576), (128, 40960), (256, 88064), (512, 139264), (1024, 135168)),
    "16bit": ((16, 20480), (32, 28672), (64, 65536), (128, 49152), (256, 81920), (512, 139264), (1024, 135168)),
}


def shared_bytes(k_p: int, dtype: torch.dtype) -> int:
    """The most shared memory per block the kernels' builds take at K_P padded columns in `dtype` (`SHARED_BYTES`)."""
    rows = SHARED_BYTES[dtype_class(dtype)]
    return next((n for limit, n in rows if k_p <= limit), rows[-1][1])


# The kernels index their tensors in 32 bits (64-bit offsets left 8-32 B stacks in the AOT builds). What they index
# grows with the tokens T: G·T·W elements for G sites, W the widest row a launch reads or writes (D, a projection's O
# or its gradient's row stride, K_P); and G·S·T·K_P for the partial sums of S splits over D or O, which exist only
# while cdiv(T, BT)·G < 264 programs (`triton_common.split_tiles`), so S·T < SPLIT_ROWS = 2·264·64 when S > 1.
INDEX_LIMIT = 2**31
SPLIT_ROWS = 2 * 264 * 64


def max_tokens(width: int, groups: int, k_p: int) -> int:
    """The most tokens one call of `groups` sites at K_P padded columns whose widest row is `width` may take in
    32-bit indexing (0 where even the split partials G·SPLIT_ROWS·K_P reach it)."""
    if groups * SPLIT_ROWS * max(k_p, 32) >= INDEX_LIMIT:
        return 0
    return (INDEX_LIMIT - 1) // (groups * max(width, k_p, 32))


def index_unfit(t, d: int, o: int, groups: int, k_p: int) -> str:
    """Why a call of T tokens, D in and O out features (O: the widest output or gradient row) for `groups` sites at
    K_P padded columns is past the kernels' 32-bit indexing ('' when it is not). The reason names the limit, not
    T, so that it warns once whatever T each call has."""
    limit = max_tokens(max(d, o), groups, k_p)
    if t <= limit:
        return ""
    return (f"{groups} site(s) at {max(d, o, k_p, 32)} columns (the widest of D, O and K_P) and K_P {k_p} take at "
            f"most {limit} tokens per call in the kernels' 32-bit indexing (2^31 elements per tensor)")


def check_index(t, d: int, o: int, groups: int, k_p: int) -> None:
    """Raise where a launch would index past 32 bits (`index_unfit`): the op's choice of path
    (`backend.resolve_kernels` with the call's widest row) keeps such calls off the kernels, so this only stops a
    caller that skipped it, before offsets wrap into other rows."""
    why = index_unfit(t, d, o, groups, k_p)
    if why:
        raise RuntimeError(f"amole: the Triton kernels cannot take this call: {why}")


def unsupported(num_experts: int, rank: int) -> str:
    """Why the kernels cannot take E experts of rank R ('' when they can): outside the compile matrix."""
    if num_experts > MAX_EXPERTS:
        return (f"{num_experts} experts exceed the Triton kernels' limit of {MAX_EXPERTS} (the routing epilogue "
                "holds all experts of a token in registers; larger E is not compiled or tested)")
    k_p = padded_columns(num_experts, rank)
    if k_p > MAX_K_P:
        return (f"E_P * R_P = {k_p} padded adapter columns (E = {num_experts}, rank {rank}, each rounded up to a power "
                f"of two) exceed the Triton kernels' limit of {MAX_K_P}: no block configuration keeps the "
                "[tokens, E_P * R_P] accumulator in a block's registers and shared memory")
    return ""


def choose(kernel: str, k_p: int, dtype: torch.dtype) -> Blocks:
    """The launch configuration of `kernel` for K_P padded adapter columns and activations of `dtype`."""
    for limit, blk in TABLE.get((kernel, dtype_class(dtype)), ()):
        if k_p <= limit:
            return blk
    return DEFAULT
