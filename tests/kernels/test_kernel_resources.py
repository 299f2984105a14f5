"""The Triton kernels compile for real GPUs (sm_80, sm_90) without spilling registers and within a block's shared
memory, for a subset of the AOT matrix (`benchmarks/kernel_resources.py` runs all of it), and every block
configuration of `blocks.TABLE` computes the torch path's numbers (interpreter).

The compiles run in a subprocess: the test session runs the kernels under TRITON_INTERPRET=1, where they are
interpreted functions that cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_adapter_kernels import check, make
from test_device_limits import falls_back_once

from amole_compile.kernels import blocks, register, triton_common

ROOT = Path(__file__).resolve().parents[2]

# One op configuration per K_P (16 .. 1024), both dtype classes, each arch, and the builds that left a small stack
# before the table's stage-count rows (2026-12-04: fp32 fwd at K_P 32 / 128 / 256 and bwd_weight at 128 on sm_90,
# 16-bit bwd_weight at K_P 16 on sm_80 and bwd_route at 512 on sm_90) or, as a group of three sites, before the
# rows re-searched on 2026-12-06 (fp32 fwd at K_P 16 / 128 / 1024, fp32 bwd_weight at 256, 16-bit fwd at 128);
# per case the 7 kernels as few tokens launch them (16 tokens per program, splits over D and O, the finishing
# kernels, the reduce), and the 4 tiled kernels again with the table's tiles (`_aot.SHAPES`).
SUBSET = [("float32", "adamole", 4, 4, True, 90), ("bfloat16", "mole", 8, 4, False, 80),
          ("float16", "adamole", 8, 8, True, 90), ("float32", "lora", 1, 64, True, 80),
          ("bfloat16", "adamole", 16, 16, True, 90), ("float32", "mole", 16, 32, False, 90),
          ("float32", "adamole", 16, 64, False, 80), ("float32", "adamole", 16, 1, True, 90),
          ("float32", "adamole", 2, 64, True, 80), ("float32", "mole", 16, 16, False, 80),
          ("bfloat16", "adamole", 16, 8, False, 90),
          ("float32", "lora", 1, 32, True, 90), ("float32", "adamole", 8, 16, False, 90),
          ("float32", "adamole", 8, 32, True, 90), ("float32", "adamole", 16, 8, False, 90),
          ("bfloat16", "mole", 16, 1, False, 80), ("float16", "adamole", 8, 64, False, 90)]

_SCRIPT = """
import json, sys
from amole_compile.kernels import _aot as aot
out = []
for dtype, method, e, r, dropout, arch in json.loads(sys.argv[1]):
    for spec in aot.specialisations([aot.Case(dtype, method, e, r, dropout)]):
        usage = aot.measure(spec, arch)
        out.append([spec.name, spec.label(), arch, usage.registers, usage.shared, usage.local, usage.stack,
                    aot.problems(usage, arch, spec)])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_kernels_compile_without_spills_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(SUBSET)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    builds = json.loads(proc.stdout.strip().splitlines()[-1])
    # per case: 7 kernels at few tokens, and the 4 with the table's tiles again at many (some builds coincide); the
    # finishing kernels again where one split makes S the constant 1; and as much again for a group of sites (the
    # GROUPED builds, the input-gradient kernel's ADD)
    assert 7 * len(SUBSET) <= len(builds) <= 26 * len(SUBSET), len(builds)
    bad = [b for b in builds if b[-1]]
    assert not bad, "\n".join(f"sm_{b[2]} {b[0]} {b[1]}: REG {b[3]} SHARED {b[4]}: {b[-1]}" for b in bad)


def _table_configs():
    seen = {}
    for (kernel, cls), rows in blocks.TABLE.items():
        for k_p, blk in rows:
            seen.setdefault(blk, (kernel, cls, k_p))
    return sorted(seen.items(), key=lambda kv: (kv[0].bt, kv[0].bd, kv[0].num_warps))


@pytest.mark.parametrize("blk,where", _table_configs(), ids=lambda v: f"{v.bt}x{v.bd}w{v.num_warps}"
                         if isinstance(v, blocks.Blocks) else f"{v[0]}-{v[1]}-{v[2]}")
def test_each_block_configuration_matches_the_torch_path(monkeypatch, blk, where):
    """Every configuration of the table, forced on all four kernels (the interpreter ignores warps/stages)."""
    monkeypatch.setattr(blocks, "choose", lambda kernel, k_p, dtype: blk)
    check(make("adamole", e=4, r=4, t=70, d=80, o=72))


@pytest.mark.parametrize("method,e,r", [("adamole", 16, 64), ("mole", 16, 8), ("lora", 1, 64), ("adamole", 8, 64)])
def test_largest_experts_by_rank(method, e, r):
    """K_P = 1024 (the kernels' limit) and the table's own configuration for it; K_P 512, whose finishing kernels
    take 2 tokens per program."""
    check(make(method, e=e, r=r, t=20, d=40, o=24))


def test_limits_are_named():
    assert blocks.unsupported(16, 64) == "" and blocks.unsupported(8, 4) == ""
    assert "limit of 1024" in blocks.unsupported(16, 65)
    assert "limit of 16" in blocks.unsupported(32, 4)
    assert blocks.padded_columns(3, 5) == 32 and blocks.padded_columns(1, 1) == 16


def test_shapes_beyond_the_limits_fall_back_or_raise(monkeypatch):
    from amole_compile.kernels import backend

    x = torch.zeros(4, 8)
    with pytest.raises(RuntimeError, match="limit of 1024"):
        backend.resolve_kernels("triton", x, num_experts=16, rank=128)
    # 'auto' where the kernels would run (a CUDA tensor): the torch path, with a warning naming why, once
    monkeypatch.setattr(backend, "triton_usable", lambda x, explicit=False: (True, ""))
    monkeypatch.setattr(backend, "_on_gpu", lambda x: True)
    monkeypatch.setattr(backend, "_warned", set())
    falls_back_once(x, 32, 4, "limit of 16")
    assert backend.resolve_kernels("auto", x, num_experts=8, rank=4) == "triton"


def test_explicit_triton_through_the_op_raises_before_any_launch(monkeypatch):
    args = make("adamole", e=32, r=1, t=8, d=16, o=8, thr_state="active")
    launches: list = []
    monkeypatch.setattr(triton_common, "recorder", launches)
    with pytest.raises(RuntimeError, match="limit of 16"):
        register().adapter(*args.values(), "triton")
    assert launches == []


def test_table_rows_come_from_the_candidates_in_increasing_k_p():
    """`blocks.TABLE` is what `kernel_resources.py --search` picks from `blocks.CANDIDATES`: a row that is not a
    candidate was typed in by hand, and the matrix was never searched for it."""
    for (kernel, cls), rows in blocks.TABLE.items():
        limits = [k_p for k_p, _ in rows]
        assert limits == sorted(limits) and limits[-1] == blocks.MAX_K_P, (kernel, cls, limits)
        for k_p, blk in rows:
            assert blk in blocks.CANDIDATES[(kernel, cls)], (kernel, cls, k_p, blk)


def test_the_99_kb_gpus_are_held_to_their_own_opt_in():
    """`kernel_resources.py --archs 86,89,120` holds those builds to 99 KB a block (RTX 30 / 40 / 50, A10, L4,
    L40S), not to an A100's 163 KB."""
    from amole_compile.kernels import _aot as aot

    for arch in (86, 89, 120):
        assert aot.problems(aot.Usage(128, 99 * 1024, 0, 0), arch) == []
        assert aot.problems(aot.Usage(128, 99 * 1024 + 1, 0, 0), arch) == [
            f"shared memory {99 * 1024 + 1} B > {99 * 1024} B"]
    assert aot.problems(aot.Usage(128, 99 * 1024 + 1, 0, 0), 80) == []
