"""`benchmarks/kernel_resources.py --kernels`: the AOT matrix builds only the named kernels' specialisations (it
built every kernel whatever was named, so checking one kernel took the whole matrix's half hour), and a name no
kernel has stops the run before anything is built or recorded. No compile runs here: the selection is checked on
the specialisations the launchers record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_SELECT = """
import json, sys
sys.path.insert(0, "benchmarks")
import kernel_resources as kr
from amole_compile.kernels import _aot as aot
specs = aot.specialisations(aot.cases(("float32",), ("adamole",), (4,), (4,), (True,)))
out = {"all": sorted({kr.kernel_name(s) for s in specs}),
       "route": sorted({s.name for s in kr.only_kernels(specs, ("bwd_route", "fwd_finish"))}),
       "none": len(kr.only_kernels(specs, None)) == len(specs)}
try:
    kr.only_kernels(specs, ("bwd_rout",))
except SystemExit as e:
    out["typo"] = str(e)
print(json.dumps(out))
"""


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_kernels_selects_the_matrix_builds():
    proc = subprocess.run([sys.executable, "-c", _SELECT], capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"fwd", "fwd_finish", "bwd_route", "bwd_route_finish", "bwd_weight", "bwd_reduce",
            "bwd_input"} <= set(out["all"])
    assert out["route"] == ["_bwd_route_kernel", "_fwd_finish_kernel"]
    assert out["none"]
    assert "no kernel named bwd_rout" in out["typo"] and "bwd_route" in out["typo"]


def test_an_unknown_kernel_stops_the_run_before_any_build():
    results = ROOT / "benchmarks" / "results" / "kernel_resources.csv"
    before = results.read_bytes() if results.exists() else None
    proc = subprocess.run([sys.executable, "benchmarks/kernel_resources.py", "--kernels", "fwdd", "--dtypes",
                           "float32", "--methods", "lora", "--experts", "1", "--ranks", "4", "--jobs", "1"],
                          capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert proc.returncode != 0 and "no kernel named fwdd" in proc.stderr, proc.stderr[-3000:]
    assert "builds in" not in proc.stdout
    assert (results.read_bytes() if results.exists() else None) == before
