"""Launch plans (`kernels/plans.py`): worked out once per distinct call, and exactly the launches the launchers
make: a swapped tile table, the interpreter's upcast and every flag give plans of their own, and the recorded
launches of a forward + backward are the plans' grids, constexprs and blocks."""

from __future__ import annotations

import pytest
import torch

from amole_compile.kernels import _aot, blocks, plans
from amole_compile.kernels.adapter_triton import adapter_triton
from amole_compile.kernels.adapter_triton_bwd import adapter_backward_triton
from amole_compile.kernels.triton_common import MIN_PROGRAMS, cdiv

BF16 = torch.bfloat16


def fwd_plan(t=1024, d=512, e=8, k=32, method="adamole", choose=None, **kw):
    args = dict(top_k=0, dtype=BF16, has_keep=True, has_aux=True, upcast=False)
    args.update(kw)
    return plans.forward_plan(t, d, e, k, method, args["top_k"], args["dtype"], args["has_keep"], args["has_aux"],
                              args["upcast"], choose or blocks.choose)


def test_a_plan_is_made_once_per_distinct_call():
    assert fwd_plan() is fwd_plan()
    assert fwd_plan(t=1025) is not fwd_plan()
    for flag in ("has_keep", "has_aux", "upcast"):
        other = fwd_plan(**{flag: True if flag == "upcast" else False})
        assert other is not fwd_plan()
    assert fwd_plan(upcast=True).main.constexprs["UPCAST"] is True
    assert fwd_plan(upcast=True).main.constexprs["PRECISION"] == "ieee"
    assert fwd_plan().main.constexprs["PRECISION"] == "tf32"
    assert fwd_plan(dtype=torch.float32).main.constexprs["PRECISION"] == "ieee"


def test_a_swapped_tile_table_gets_plans_of_its_own():
    tile = blocks.Blocks(32, 32, num_warps=2, num_stages=3)
    swapped = fwd_plan(choose=lambda kernel, k_p, dtype: tile)
    assert swapped is not fwd_plan()
    assert (swapped.main.blk.bd, swapped.main.kwargs["num_warps"], swapped.main.kwargs["num_stages"]) == (32, 2, 3)
    assert swapped.main.kwargs["BD"] == 32 and swapped.main.constexprs["BD"] == 32
    assert "num_warps" not in swapped.main.constexprs  # what the AOT recorder gets


@pytest.mark.parametrize("t", [1024, 8192])
def test_plans_fill_the_gpu(t):
    fwd = fwd_plan(t=t)
    bwd = plans.backward_plan(t, 512, 512, 8, 32, "adamole", 0, BF16, True, False, True, 8, True, False,
                              blocks.choose)
    launches = [fwd.main, fwd.finish, bwd.route, bwd.route_finish, bwd.weight, bwd.reduce, bwd.input]
    least = MIN_PROGRAMS if t >= 8192 else cdiv(MIN_PROGRAMS, 2)  # issue 21: 264 from T = 8192, 132 at 1024
    assert all(_programs(x.grid) >= least for x in launches), [x.grid for x in launches]


def _programs(grid):
    n = 1
    for g in grid:
        n *= g
    return n


@pytest.mark.parametrize("method,e,r,need_x", [("adamole", 8, 4, True), ("mole", 4, 8, False), ("lora", 1, 32, True)])
def test_recorded_launches_are_the_plans(method, e, r, need_x):
    t, d, o, k = 40, 96, 80, e * r
    er = {"adamole": e + 1, "mole": e, "lora": 0}[method]
    meta = dict(device="meta", dtype=BF16)
    x, a, b = torch.empty(t, d, **meta), torch.empty(k, d, **meta), torch.empty(o, k, **meta)
    gate = torch.empty(e, d, **meta) if er else None
    tw, tb = (torch.empty(1, d, **meta), torch.empty(1, **meta)) if method == "adamole" else (None, None)
    keep = torch.empty(t, d, device="meta", dtype=torch.bool)
    with _aot.record_launches() as launches:
        adapter_triton(x, keep, a, b, gate, tw, tb, None, method, e, 0, 1.0, 1.0, 1.1, True)
        sums = torch.empty(2, e, device="meta") if er else None
        adapter_backward_triton(torch.empty(t, o, **meta), None, x, keep, a, b, gate, tw, tb, torch.empty(t, k, **meta),
                                torch.empty(t, max(er, 1), device="meta"), method, e, 0, 1.0, 1.0, 1.1, need_x,
                                torch.empty((), device="meta") if er else None, sums)
    fwd = plans.forward_plan(t, d, e, k, method, 0, BF16, True, er > 0, False, blocks.choose)
    bwd = plans.backward_plan(t, d, o, e, k, method, 0, BF16, True, False, er > 0, e if er else 0, need_x, False,
                              blocks.choose)
    want = [fwd.main, fwd.finish, bwd.route, bwd.route_finish, bwd.weight, bwd.reduce] + ([bwd.input] * need_x)
    assert [(g, c, blk) for _, g, _, c, blk in launches] == [(w.grid, w.constexprs, w.blk) for w in want]


def test_symbolic_token_counts_trace_through_the_launchers():
    """torch.compile(dynamic=True) traces the Triton path with T a SymInt (a GPU's graph: wrap_triton): the plans
    (and the cached tile helpers) cannot hash it and are worked out uncached, with T symbolic in the grids."""
    from torch.fx.experimental.proxy_tensor import make_fx

    e, r, d, o = 8, 4, 96, 80

    def fwd_bwd(x, a, b, gate, tw, tb, go):
        out = adapter_triton(x, None, a, b, gate, tw, tb, None, "adamole", e, 0, 1.0, 1.0, 1.0, True)
        grads = adapter_backward_triton(go, None, x, None, a, b, gate, tw, tb, out[3], out[4], "adamole", e, 0, 1.0,
                                        1.0, 1.0, True, out[5], out[6])
        return out[0], grads[0]

    args = (torch.randn(40, d), torch.randn(e * r, d), torch.randn(o, e * r), torch.randn(e, d), torch.randn(1, d),
            torch.randn(1), torch.randn(40, o))
    with _aot.record_launches() as launches:
        make_fx(fwd_bwd, tracing_mode="symbolic")(*args)
    assert len(launches) == 7
    assert any(isinstance(n, torch.SymInt) for _, grid, _, _, _ in launches for n in grid)  # T stayed symbolic
