"""Launch plans: all that the Triton launchers derive from a call's sizes and flags (tiles, splits, grids,
constexprs, warps, workspace shapes), worked out once per distinct call and then looked up.

A site runs the same shapes step after step, so an eager call's host time goes to allocations and launches
only (issue 21: on a GPU, host time is what the kernels wait for). The plans are pure functions of their
arguments, cached (`triton_common.cache_sizes`: a symbolic size under torch.compile(dynamic=True) is worked out
uncached); the tile table's `blocks.choose` is one of them, so code that swaps it (the AOT search in
`benchmarks/kernel_resources.py`, tests) gets plans of its own. Legend as in `triton_common.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .blocks import Blocks
from .methods import method_spec
from .triton_common import (
    MIN_PROGRAMS,
    cache_sizes,
    cdiv,
    few_tokens,
    finish_blocks,
    geometry,
    router_rows,
    split_tiles,
)


@dataclass(frozen=True, eq=False)
class Launch:
    """One kernel launch: its grid, its constexprs, and the warps / stages (`blk`); `kwargs` is what the launch
    passes by keyword (the constexprs, num_warps and num_stages)."""

    grid: tuple[int, ...]
    constexprs: dict
    blk: Blocks
    kwargs: dict = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kwargs", dict(self.constexprs, num_warps=self.blk.num_warps,
                                                 num_stages=self.blk.num_stages))


def _modes(dtype: torch.dtype, upcast: bool) -> dict:
    """tl.dot's input precision (exact for float32, and for the interpreter's upcast bf16) and UPCAST."""
    return {"PRECISION": "ieee" if dtype == torch.float32 or upcast else "tf32", "UPCAST": upcast}


@dataclass(frozen=True, eq=False)
class ForwardPlan:
    """The forward's two launches (`adapter_triton.adapter_triton_group`) for T tokens of D columns, G sites."""

    r: int  # rank per expert
    er: int  # router rows
    geo: dict  # E_P, R_P, G_P
    k_p: int
    g_p: int
    splits: int  # D splits of the main kernel per site (its partial sums [G, S, ...])
    per: int  # columns per split
    n_f: int  # programs of the finishing kernel (and rows of its aux column sums)
    has_aux: bool
    aux_scale: float  # E / T², the aux loss's d / d scores per selected expert
    main: Launch
    finish: Launch


def _sizes(e: int, k: int, method: str) -> tuple[int, int, dict, int]:
    """(R, Er, geometry, K_P) for E experts of K = E * R columns."""
    r, er = k // e, router_rows(method, e)
    geo = geometry(e, r, er)
    return r, er, geo, geo["E_P"] * geo["R_P"]


@cache_sizes(maxsize=1024)
def forward_plan(t: int, d: int, e: int, k: int, method: str, top_k: int, dtype: torch.dtype, has_keep: bool,
                 has_aux: bool, upcast: bool, choose: Callable, groups: int = 1) -> ForwardPlan:
    """The forward's plan (T > 0) for `groups` sites in each launch; `choose`: the tile table (`blocks.choose`)."""
    r, er, geo, k_p = _sizes(e, k, method)
    g_p = geo["G_P"]
    blk, splits, per = split_tiles("fwd", k_p, dtype, t, d, choose, groups)
    main = Launch((cdiv(t, blk.bt), splits, groups), dict(HAS_KEEP=has_keep, **_modes(dtype, upcast), BT=blk.bt,
                                                         BD=blk.bd, K_P=k_p, G_P=g_p, GROUPED=groups > 1), blk)
    fin = finish_blocks(k_p)
    n_f = cdiv(t, fin.bt)
    finish = Launch((n_f, groups), dict(METHOD=method_spec(method).code, TOP_K=max(top_k, 1), HAS_AUX=has_aux,
                                         BT=fin.bt, **geo, GROUPED=groups > 1), fin)
    return ForwardPlan(r, er, geo, k_p, g_p, splits, per, n_f, has_aux, e / (t * t), main, finish)


@dataclass(frozen=True, eq=False)
class BackwardPlan:
    """The backward's launches (`adapter_triton_bwd.adapter_backward_triton_group`) for T tokens, D in, O out, G
    sites."""

    r: int
    er: int
    geo: dict
    o_splits: int  # O splits of the route kernel
    o_per: int
    n_f: int  # programs of the route-finishing kernel (and the threshold bias's per-block partials)
    route: Launch
    route_finish: Launch
    t_splits: int  # T splits of the weight kernel (its partials' leading size)
    t_rows: int  # rows per T split
    weight: Launch
    reduce: Launch
    reduce_sizes: tuple[int, ...]  # K*D, NG*D, Er*D, max(Er, 1)*D
    n_gate: int
    input: Launch | None  # None when x needs no gradient; the input-gradient kernel of a group's first site
    input_add: Launch | None  # of the group's other sites (adding to grad_x); None for one site


@cache_sizes(maxsize=1024)
def backward_plan(t: int, d: int, o: int, e: int, k: int, method: str, top_k: int, dtype: torch.dtype,
                  has_keep: bool, has_gs: bool, has_aux: bool, n_gate: int, need_x: bool, upcast: bool,
                  choose: Callable, groups: int = 1) -> BackwardPlan:
    """The backward's plan (T > 0) for `groups` sites, `o` their largest O (the route kernel's launch per site
    splits every site's O alike: a split past a site's O writes zeros); `n_gate`: the gate's rows (0 without
    one)."""
    r, er, geo, k_p = _sizes(e, k, method)
    modes = _modes(dtype, upcast)
    blk, o_splits, o_per = split_tiles("bwd_route", k_p, dtype, t, o, choose)
    route = Launch((cdiv(t, blk.bt), o_splits), dict(**modes, BT=blk.bt, BO=blk.bd, K_P=k_p), blk)
    fin = finish_blocks(k_p)
    n_f = cdiv(t, fin.bt)
    route_finish = Launch((n_f, groups), dict(METHOD=method_spec(method).code, TOP_K=max(top_k, 1), HAS_GS=has_gs,
                                               HAS_AUX=has_aux, BT=fin.bt, **geo, GROUPED=groups > 1), fin)
    weight, t_splits, t_rows = _weight_launch(t, d, k_p, dtype, has_keep, modes, geo, choose, groups)
    red = reduce_blocks((k + er) * d, groups)
    reduce = Launch((cdiv((k + er) * d, red.bd), groups), dict(BLOCK=red.bd, GROUPED=groups > 1), red)
    inp = inp_add = None
    if need_x:
        blk = choose("bwd_input", k_p, dtype)
        blk = few_tokens(blk, cdiv(t, blk.bt) * cdiv(d, blk.bd))
        consts = dict(HAS_KEEP=has_keep, **modes, BT=blk.bt, BD=blk.bd, **geo)
        inp = Launch((cdiv(t, blk.bt), cdiv(d, blk.bd)), dict(consts, ADD=False), blk)
        if groups > 1:
            inp_add = Launch(inp.grid, dict(consts, ADD=True), blk)
    return BackwardPlan(r, er, geo, o_splits, o_per, n_f, route, route_finish, t_splits, t_rows, weight, reduce,
                        (k * d, n_gate * d, er * d, max(er, 1) * d), n_gate, inp, inp_add)


def _weight_launch(t: int, d: int, k_p: int, dtype: torch.dtype, has_keep: bool, modes: dict, geo: dict,
                   choose: Callable, groups: int) -> tuple[Launch, int, int]:
    """The weight-gradient kernel: D blocks x T splits x (sites x K chunks of BK columns) -> (launch, T splits,
    rows each)."""
    blk = choose("bwd_weight", k_p, dtype)
    bk = min(blk.bk or k_p, k_p)
    per_split = cdiv(d, blk.bd) * (k_p // bk) * groups
    blk = few_tokens(blk, per_split * cdiv(t, blk.bt))
    splits, rows = _t_split(t, blk, per_split)
    launch = Launch((cdiv(d, blk.bd), splits, k_p // bk * groups),
                    dict(HAS_KEEP=has_keep, **modes, BT=blk.bt, BD=blk.bd, BK=bk, **geo, GROUPED=groups > 1), blk)
    return launch, splits, rows


def _t_split(t: int, blk: Blocks, programs: int) -> tuple[int, int]:
    """How many T splits the weight-gradient kernel sums over, and the rows of each (a multiple of BT): at least
    `blk.split_t`, and enough that `programs` per split reach MIN_PROGRAMS, up to one BT block per split."""
    want = max(blk.split_t, cdiv(MIN_PROGRAMS, programs))
    rows = max(blk.bt, t // want // blk.bt * blk.bt)
    return cdiv(t, rows), rows


def reduce_blocks(n: int, groups: int = 1) -> Blocks:
    """_bwd_reduce_kernel over n elements of `groups` sites: 256 per program, fewer (down to 32) until the grid
    has MIN_PROGRAMS."""
    block = 256
    while block > 32 and cdiv(n, block) * groups < MIN_PROGRAMS:
        block //= 2
    return Blocks(1, block, num_warps=max(1, block // 64), num_stages=1)
