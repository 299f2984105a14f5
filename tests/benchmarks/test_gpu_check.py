"""`benchmarks/gpu_check.py --cpu-smoke` runs end to end on CPU (tiny shapes, eager): the GPU check cannot crash
for a reason a CPU could have caught. No figure is checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def smoke(out: Path, *args: str) -> dict:
    """Run `gpu_check.py --cpu-smoke *args` -> its JSON result."""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "AMOLE_KERNELS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out",
                           str(out), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text())


def test_cpu_smoke_runs_and_writes_its_results(tmp_path):
    result = smoke(tmp_path)
    launch = [r for r in result["rows"] if r["section"] == "launch"]
    assert [r["contender"] for r in launch] == ["triton kernel[grid]", "triton kept build", "aten add"]
    assert all(r["host us per launch"] > 0 for r in launch)
    layer = [r["contender"] for r in result["rows"] if r["section"] == "layer"]
    assert layer == ["frozen linear", "+ lora32", "+ amole triton", "+ amole torch", "+ amole triton unfolded"]
    train = [r for r in result["rows"] if r["section"] == "train"]
    assert [r["mode"] for r in train] == ["eager", "eager"] and all(r["tokens/s"] > 0 for r in train)
    assert not [n for n in result["notes"] if "failed" in n], result["notes"]
    assert (tmp_path / "gpu_check.csv").read_text().count("\n") == 1 + len(result["rows"])


@pytest.mark.slow
def test_compiled_training_rows_hold_the_torch_path_contender(tmp_path):
    """Compiled, AdaMoLE runs on its kernels and on its torch path (the measurement behind
    `backend.COMPILED_AUTO`), beside LoRA."""
    result = smoke(tmp_path, "--sections", "train", "--modes", "compile")
    train = [(r["mode"], r["contender"]) for r in result["rows"] if r["section"] == "train"]
    assert [c for _, c in train][:2] == ["amole", "amole torch path"] and len(train) == 3, train
    assert {m for m, _ in train} == {"compile"} and not result["notes"], result["notes"]


def test_top_kernels_sums_launches_by_name_and_keeps_the_costliest():
    """The layer rows' breakdown on a GPU (profiler events stood in for): per kernel name, its launches summed."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from types import SimpleNamespace

    from gpu_check import top_kernels

    def event(name: str, us: float):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(elapsed_us=lambda: us))

    events = [event("_fwd_kernel", 10.0), event("sm90 gemm bf16", 100.0), event("_fwd_kernel", 5.0),
              event("_bwd_input_kernel", 1.0)]
    assert top_kernels(events) == "sm90_gemm_bf16=100 _fwd_kernel=15 _bwd_input_kernel=1"
    assert top_kernels(events, n=1) == "sm90_gemm_bf16=100"
