"""The group launchers (`adapter_triton_group`, `adapter_backward_triton_group`): G sites sharing x and the op's
scalars, each with its own parameters (and O), in one set of launches. Per site every result equals the torch
path's for that site (`adapter_torch` / `adapter_backward_torch`), x's gradient summed over the sites; the
per-site launchers are G = 1 of them (`test_adapter_kernels.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_adapter_kernels import DEVICE, GRADS, _close, make

from amole_compile.kernels.adapter_torch import adapter_backward_torch, adapter_torch
from amole_compile.kernels.adapter_triton import adapter_backward_triton_group, adapter_triton_group

OUTS = ("out", "scores", "mask", "za", "zr", "aux", "aux_sums")
SITE = ("lora_a", "lora_b", "gate_w", "thr_w", "thr_b", "base")  # each site's own parameters
SCALARS = ("method", "num_experts", "top_k", "scale", "max_threshold", "drop_scale")


def make_group(os_, method="adamole", dtype=torch.float32, dropout=True, thr_state="partial", t=37, d=45, seed=0):
    """G sites' arguments (one `make` per site, O of site g os_[g]) sharing site 0's x and scalars, each its own
    parameters and dropout mask."""
    sites = [make(method, t=t, d=d, o=o, dtype=dtype, dropout=dropout, thr_state=thr_state, seed=seed + g)
             for g, o in enumerate(os_)]
    for s in sites[1:]:
        s["x"] = sites[0]["x"]
        if method != "lora" and thr_state == "partial":  # site 0's x is tie-free for site 0's router only:
            s["gate_w"], s["thr_w"], s["thr_b"] = sites[0]["gate_w"] * 0.8, sites[0]["thr_w"], sites[0]["thr_b"]
    return sites


def group_args(sites):
    masks = None if sites[0]["drop_mask"] is None else torch.stack([s["drop_mask"] for s in sites])  # [G, T, D]
    return (sites[0]["x"], masks, *([s[k] for s in sites] for k in SITE), *(sites[0][k] for k in SCALARS))


def run_group(sites, dtype, need_grad_x=True, seed=1):
    """-> per-site torch references (forward, backward) and the group's results, every site's aux given a
    gradient."""
    refs = [adapter_torch(*s.values(), True) for s in sites]
    got = adapter_triton_group(*group_args(sites), True)
    g = torch.Generator().manual_seed(seed)
    gos = [torch.randn(r[0].shape, generator=g).to(DEVICE, dtype) for r in refs]
    has_gate = sites[0]["method"] != "lora"
    gss = [torch.randn(r[1].shape, generator=g).to(DEVICE) for r in refs] if has_gate else None
    gaux = [torch.randn((), generator=g).to(DEVICE) for _ in refs] if has_gate else None
    ref_b = []
    for i, (s, r) in enumerate(zip(sites, refs, strict=True)):
        common = [s[k] for k in ("x", "drop_mask", "lora_a", "lora_b", "gate_w", "thr_w", "thr_b")]
        ref_b.append(adapter_backward_torch(gos[i], gss[i] if has_gate else None, *common, r[3], r[4],
                                            *(s[k] for k in SCALARS), need_grad_x, gaux[i] if has_gate else None,
                                            r[6]))
    x, masks, lora_as, lora_bs, gates, thr_ws, thr_bs, _, *scalars = group_args(sites)
    got_b = adapter_backward_triton_group(gos, torch.stack(gss) if has_gate else None, x, masks, lora_as, lora_bs,
                                          gates, thr_ws, thr_bs, got[3], got[4], *scalars, need_grad_x,
                                          torch.stack(gaux) if has_gate else None, got[6] if has_gate else None)
    return refs, got, ref_b, got_b


def check_group(sites, dtype=torch.float32, need_grad_x=True):
    refs, got, ref_b, got_b = run_group(sites, dtype, need_grad_x)
    n = len(sites)
    outs, *stacked = got
    assert len(outs) == n and all(len(v) == n for v in stacked[:4]), [v.shape for v in stacked]
    for i, ref in enumerate(refs):
        for name, a, b in zip(OUTS, (outs[i], *(v[i] if len(v) == n else v for v in stacked)), ref, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype, f"site {i} {name}: {a.shape}/{a.dtype} vs {b.shape}"
            if name == "mask":
                assert torch.equal(a, b), f"site {i}: expert masks differ"
            elif b.numel():
                _close(a, b, dtype, f"site {i} {name}")
    grad_x, *per_site = got_b
    if need_grad_x:
        _close(grad_x, sum(r[0] for r in ref_b), dtype, "grad x (summed)")
    else:
        assert grad_x.numel() == 0
    for name, gots in zip(GRADS[1:], per_site, strict=True):
        assert len(gots) == n, name
        for i, (a, r) in enumerate(zip(gots, ref_b, strict=True)):
            b = r[1 + GRADS[1:].index(name)]
            assert a.shape == b.shape and a.dtype == b.dtype, f"site {i} grad {name}: {a.shape}/{a.dtype} vs {b.shape}"
            if b.numel():
                _close(a, b, dtype, f"site {i} grad {name}")
    return refs


SIZES = {1: (29,), 2: (29, 13), 3: (29, 13, 13)}


@pytest.mark.parametrize("dropout", [True, False])
@pytest.mark.parametrize("method", ["adamole", "mole", "lora"])
@pytest.mark.parametrize("g", [1, 2, 3])
def test_group_matches_the_torch_path_per_site(g, method, dropout):
    check_group(make_group(SIZES[g], method, dropout=dropout))


@pytest.mark.parametrize("method", ["adamole", "mole", "lora"])
def test_group_bfloat16(method):
    check_group(make_group(SIZES[3], method, dtype=torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("thr_state", ["active", "masked"])
def test_group_threshold_states(thr_state):
    check_group(make_group(SIZES[3], "adamole", thr_state=thr_state))


def test_group_without_grad_x_and_zero_tokens():
    check_group(make_group(SIZES[2], "adamole"), need_grad_x=False)
    sites = make_group(SIZES[3], "adamole", t=0)
    outs, scores, *_ = adapter_triton_group(*group_args(sites), True)
    assert [o.shape for o in outs] == [(0, o) for o in SIZES[3]] and scores.shape == (3, 0, 4)


def test_group_more_programs_fewer_splits():
    """The splits over D and O fill MIN_PROGRAMS over all G sites of a launch: G = 3 splits D no more than
    G = 1 does, and every launch still has the programs issue 21 asks for (T = 1024 and 8192, D = O = 512 and
    4096)."""
    from amole_compile.kernels import blocks, plans
    from amole_compile.kernels.triton_common import MIN_PROGRAMS, cdiv

    for t in (1024, 8192):
        least = MIN_PROGRAMS if t >= 8192 else cdiv(MIN_PROGRAMS, 2)
        for d in (512, 4096):
            for g in (1, 3):
                fwd = plans.forward_plan(t, d, 8, 32, "adamole", 0, torch.bfloat16, True, True, False, blocks.choose,
                                         g)
                bwd = plans.backward_plan(t, d, d, 8, 32, "adamole", 0, torch.bfloat16, True, False, True, 8, True,
                                          False, blocks.choose, g)
                for x in (fwd.main, fwd.finish, bwd.route, bwd.route_finish, bwd.weight, bwd.reduce, bwd.input):
                    assert _programs(x.grid) >= least, (t, d, g, x.grid)
            one = plans.forward_plan(t, d, 8, 32, "adamole", 0, torch.bfloat16, True, True, False, blocks.choose, 1)
            assert fwd.splits <= one.splits


def _programs(grid):
    n = 1
    for v in grid:
        n *= v
    return n


@pytest.fixture
def counting():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from _counting import counting

    return counting


def _fwd_bwd(sites, counting):
    """A counted training forward, then a counted backward (the gradients made between, uncounted) -> the two
    counters' launches: (Triton kernel names, ATen ops); after an uncounted forward (the cached zero rows)."""
    x, masks, lora_as, lora_bs, gates, thr_ws, thr_bs, bases, *scalars = group_args(sites)
    adapter_triton_group(x, masks, lora_as, lora_bs, gates, thr_ws, thr_bs, bases, *scalars, True)
    with counting() as fwd:
        out = adapter_triton_group(x, masks, lora_as, lora_bs, gates, thr_ws, thr_bs, bases, *scalars, True)
    gos, gaux = [torch.ones_like(o) for o in out[0]], out[5].new_ones(len(sites))
    with counting() as bwd:
        adapter_backward_triton_group(gos, None, x, masks, lora_as, lora_bs, gates, thr_ws, thr_bs, out[3], out[4],
                                      *scalars, True, gaux, out[6])
    for c in (fwd, bwd):
        assert c.summary()["syncs"] == 0 and not c.zeroed_to_kernel
    return [x.name for c in (fwd, bwd) for x in c.triton], fwd.launch_ops + bwd.launch_ops


def test_launches_of_a_group(counting):
    """A training forward + backward (dropout, aux gradient) of G = 3 sites: 2 + 5 Triton launches, plus a route
    and an input-gradient launch per site beyond the first (7 + 4 = 11, against 3 x 7 = 21 for three single-site
    calls); ATen: per site the up-projection and grad_B GEMMs, and for all sites the forward's cat of the stacked
    weights, the threshold biases' cat (forward, backward) and the aux loss's 2 ops."""
    one, three = (_fwd_bwd(make_group(SIZES[g], "adamole"), counting) for g in (1, 3))
    assert three[0] == ["_fwd_kernel", "_fwd_finish_kernel", *["_bwd_route_kernel"] * 3, "_bwd_route_finish_kernel",
                        "_bwd_weight_kernel", "_bwd_reduce_kernel", *["_bwd_input_kernel"] * 3], three[0]
    assert len(one[0]) == 7
    assert sorted(one[1]) == sorted(["cat", "sum", "bmm", "addmm", "mm"]), one[1]
    assert sorted(three[1]) == sorted(["cat"] * 3 + ["sum", "bmm"] + ["addmm"] * 3 + ["mm"] * 3), three[1]


def test_column_blocks_of_one_gradient_are_read_in_place(counting):
    """A fused projection's sites get their output gradients as column blocks of one [T, O] tensor (row stride O):
    the backward reads them where they are (the route kernel's row stride; grad_B's GEMM takes them strided), with
    the same results bit for bit as from contiguous copies, and launches no copy."""
    sites = make_group(SIZES[3], "adamole")
    x, masks, lora_as, lora_bs, gates, thr_ws, thr_bs, bases, *scalars = group_args(sites)
    out = adapter_triton_group(x, masks, lora_as, lora_bs, gates, thr_ws, thr_bs, bases, *scalars, True)
    whole = torch.randn(x.shape[0], sum(SIZES[3]), generator=torch.Generator().manual_seed(2)).to(DEVICE)  # [T, O]
    blocks = list(whole.split(list(SIZES[3]), dim=1))  # [T, O_g] views, row stride O
    assert not any(b.is_contiguous() for b in blocks)
    gaux = out[5].new_ones(len(sites))

    def backward(gos):
        return adapter_backward_triton_group(gos, None, x, masks, lora_as, lora_bs, gates, thr_ws, thr_bs, out[3],
                                             out[4], *scalars, True, gaux, out[6])

    want, got = backward([b.contiguous() for b in blocks]), backward(blocks)
    with counting() as c:  # (kernels stubbed: the launches only)
        backward(blocks)
    assert not {"clone", "copy_", "contiguous"} & set(c.launch_ops), c.launch_ops
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1:], want[1:], strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
