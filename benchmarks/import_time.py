"""`import amole_compile` time minus `import torch` time, in fresh interpreters (goal: under 0.3 s on CPU).

Each repeat starts two new Python processes, one importing torch and one importing torch then amole_compile, and
times the imports inside them; the table gives the medians and the heavy modules (triton, torch._inductor, onnx,
onnxscript, onnxruntime, matplotlib) that `import amole_compile` pulled in (there should be none).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _common as bc

PROBE = """
import json, sys, time
t0 = time.perf_counter(); import torch; t1 = time.perf_counter()
before = set(sys.modules)
{extra}
t2 = time.perf_counter()
heavy = sorted({{m.split('.')[0] if not m.startswith('torch._inductor') else 'torch._inductor'
                 for m in set(sys.modules) - before
                 if m.split('.')[0] in ('triton', 'onnx', 'onnxscript', 'onnxruntime', 'matplotlib')
                 or m.startswith('torch._inductor')}})
print(json.dumps({{"torch": t1 - t0, "package": t2 - t1, "heavy": heavy}}))
"""


def probe(extra: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(extra=extra)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    runs = [probe("import amole_compile") for _ in range(args.repeats)]
    torch_s = statistics.median(r["torch"] for r in runs)
    pkg_s = statistics.median(r["package"] for r in runs)
    heavy = sorted({m for r in runs for m in r["heavy"]})
    print(f"import time, median of {args.repeats} fresh interpreters, {bc.device_name('cpu')}")
    print(bc.table([[f"{torch_s:.3f}", f"{pkg_s:.3f}", ", ".join(heavy) or "none", "<= 0.3 s"]],
                   ["import torch s", "import amole_compile - torch s", "heavy modules", "goal"]))
    bc.append_row("import_time", {"device": bc.device_name("cpu"), "torch s": round(torch_s, 3),
                                  "amole_compile s": round(pkg_s, 3), "heavy": " ".join(heavy)})


if __name__ == "__main__":
    main()
