"""`benchmarks/tune_blocks.py`: its `--cpu-smoke` run end to end (interpreted kernels, tiny shapes: the GPU run cannot
crash for a reason a CPU could have caught), the launches it times, and how it picks a proposal. No figure of a
CPU run is checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_cpu_smoke_times_every_kernel_and_proposes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "AMOLE_KERNELS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tune_blocks.py"), "--cpu-smoke", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "tune_blocks.json").read_text())
    rows = result["rows"]
    kernels = ("fwd", "bwd_route", "bwd_weight", "bwd_input")
    assert {r["kernel"] for r in rows} == set(kernels) and all(r["ms"] > 0 and "error" not in r for r in rows)
    for k in kernels:  # the table's tile timed beside the candidates
        mine = [r for r in rows if r["kernel"] == k]
        assert sum(r["current"] for r in mine) == 1 and len(mine) >= 2
    assert [p["kernel"] for p in result["proposals"]] == list(kernels)
    assert all(p["best"] and p["x current"] > 0 for p in result["proposals"])
    assert not result["notes"], result["notes"]
    assert (tmp_path / "tune_blocks.csv").read_text().count("\n") == 1 + len(rows)


def test_the_timed_launches_are_the_kernels_own_with_the_candidate_tile():
    """Driven for three linked sites, the input-gradient kernel launches once per site, each with the candidate's
    warps and stages; the table is back in place afterwards."""
    from tune_blocks import launches_with

    from amole_compile.kernels import _aot as aot
    from amole_compile.kernels import blocks

    table = blocks.choose
    cand = blocks.Blocks(16, 32, 8, num_stages=3)
    got = launches_with("bwd_input", cand, aot.Case("float32", "adamole", 4, 4, True), (48, 48, 48), 40, 64, "cpu")
    assert [rec[0].__name__ for rec in got] == ["_bwd_input_kernel"] * 3
    assert all((blk.num_warps, blk.num_stages, blk.bd) == (8, 3, 32) for *_, blk in got)
    assert all(isinstance(a, torch.Tensor) for rec in got for a in rec[2][:5])
    assert blocks.choose is table


def test_a_proposal_is_the_fastest_candidate_that_timed_every_shape_without_spilling():
    from tune_blocks import proposals

    def row(cand, t, ms, current=False, spills=0, **kw):
        return {"kernel": "fwd", "K_P": 32, "G": 1, "T": t, "D": 64, "candidate": cand, "current": current,
                "ms": ms, "spills": spills, **kw}

    rows = [row("cur", 1, 1.0, True), row("cur", 2, 1.0, True),
            row("fast but spills", 1, 0.1, spills=16), row("fast but spills", 2, 0.1, spills=16),
            row("one shape only", 1, 0.2),
            row("good", 1, 0.6), row("good", 2, 0.9),
            row("fails", 1, 0.1), {**row("fails", 2, 0.0), "ms": None, "error": "out of resources"}]
    rows[-1].pop("ms")
    (p,) = proposals(rows)
    assert (p["current"], p["best"]) == ("cur", "good") and abs(p["x current"] - 0.75) < 1e-9
