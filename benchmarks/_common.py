"""Shared benchmark plumbing: environment facts, CSV rows, timing that interleaves the contenders."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} (torch threads {torch.get_num_threads()})"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for name in ("transformers", "triton", "peft", "onnxruntime"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "-"
    return out


def append_row(name: str, row: dict) -> Path:
    """Append a row (with date, commit and versions) to benchmarks/results/<name>.csv."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.csv"
    full = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit(), **versions(), **row}
    rows, fields = [], list(full)
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            old = list(reader.fieldnames or [])
        fields = old + [k for k in full if k not in old]  # a new column widens the header of the old rows
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows + [full])
    tmp.replace(path)
    return path


def site_fwd_bwd(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, aux_coef: float = 1e-3):
    """-> a function running one training forward + backward of an adapted `layer` on x [T, D] with output
    gradient grad [T, O], plus the aux loss's gradient (`aux_coef`) where the site (role "q") records one."""
    return sites_fwd_bwd([layer], x, [grad], aux_coef)


def sites_fwd_bwd(layers: list, x: torch.Tensor, grads: list, aux_coef: float = 1e-3):
    """`site_fwd_bwd` for several `layers` each called on the same x [T, D] (an attention block's q, k and v),
    grads: each one's output gradient [T, O]; the aux losses are read after all the forwards."""
    aux_grad = torch.tensor(aux_coef, dtype=torch.float32)

    def run() -> None:
        x.grad = None
        for layer in layers:
            for p in layer.parameters():
                p.grad = None
        outs = [layer(x) for layer in layers]  # [T, O] each
        groups = [getattr(layer, "group", None) for layer in layers]
        auxes = [a for a in (g["q"].aux for g in groups if g is not None) if a is not None]
        torch.autograd.backward(outs + auxes, list(grads) + [aux_grad.to(a.dtype) for a in auxes])

    return run


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict, steps: int, warmup: int, device: str, clock: str = "wall") -> dict[str, float]:
    """Median seconds per call of each fn, calling them round-robin so machine noise hits all alike. clock
    "process" counts this process's CPU time (all its threads) instead of wall time: on a shared CPU it is not
    inflated by other processes' time slices (CPU only)."""
    now = time.process_time if clock == "process" else time.perf_counter
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            sync(device)
            t = now()
            fn()
            sync(device)
            times[k].append(now() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def table(rows: list[list], header: list[str]) -> str:
    cols = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cols]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class Budget:
    """Wall-clock deadline; `left()` seconds remain, `notes` say what was skipped and why."""

    def __init__(self, seconds: float) -> None:
        self.end, self.notes = time.perf_counter() + seconds, []

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, need: float, what: str) -> bool:
        if self.left() >= need:
            return True
        self.notes.append(f"skipped {what}: {self.left():.0f} s left, needs ~{need:.0f} s")
        return False


def write_results(name: str, result: dict, rows: list[dict], out: Path | None) -> list[Path]:
    """<name>.json (`result`) and <name>.csv (`rows`) into `out` (else benchmarks/results, each row also appended
    to results/<name>_rows.csv with the device) and into $OUT when set (a lent GPU machine's output folder)."""
    dirs = [out or RESULTS] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    written = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with (d / f"{name}.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, restval="")
            w.writeheader()
            w.writerows(rows)
        written += [d / f"{name}.json", d / f"{name}.csv"]
    for r in rows if out is None else []:
        append_row(f"{name}_rows", {"device": result["device"], **r})
    return written
