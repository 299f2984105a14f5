"""Time the tile candidates of the op's four main Triton kernels on a GPU, and say which `blocks.TABLE` row to change
(issue 21: the table's tiles were chosen by the AOT matrix to fit the registers, never timed).

    python benchmarks/tune_blocks.py [--budget 240] [--shapes 8192x4096] [--experts 8 --ranks 4] [--groups 1]
    python benchmarks/tune_blocks.py --cpu-smoke      # tiny shapes under TRITON_INTERPRET=1 (CI: it runs)

For each kernel (fwd, bwd_route, bwd_weight, bwd_input), each T x D (= O) shape and each candidate of
`blocks.CANDIDATES` for that kernel and dtype class (bf16 by default: the tensor-core candidates): the op's training
forward + backward launchers are driven on the GPU with the candidate as that kernel's tile (the other kernels keep
the table's), their launches recorded instead of run (`_aot.record_launches`); the kernel's own launches (one per
site for the route and input kernels) are then replayed and timed alone with `triton.testing.do_bench` (median
ms). Each build's registers and spills come from the compiled kernel; a spilling candidate is reported and never
proposed. Per (kernel, K_P) the proposal is the candidate with the least time summed over the shapes, against the
table's current tile (`x current`: its time over the current one's; below 1 is faster).

Needs torch and triton only, from a checkout. Writes tune_blocks.json / .csv to benchmarks/results/ and to $OUT
when set; appends each candidate's row to results/tune_blocks_rows.csv. A time guard skips what would overrun
`--budget` (noted). Legend as in `kernels/triton_common.py`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if "--cpu-smoke" in sys.argv:  # before triton defines the kernels: interpreted, they run on CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from amole_compile.kernels import _aot as aot
from amole_compile.kernels import blocks

import _common as bc

KERNELS = blocks.KERNEL_NAMES
FULL = {"shapes": ((8192, 4096),), "dtype": "bfloat16"}  # the layer goal's shape (issue 21)
SMOKE = {"shapes": ((40, 64),), "dtype": "float32", "candidates": 2}  # the interpreter has no bf16 arithmetic


def launches_with(kernel: str, cand: blocks.Blocks, case: aot.Case, outs: tuple, t: int, d: int,
                  device: str) -> list:
    """The recorded launches of `kernel` in one training fwd + bwd of `case` (sites of O `outs`, x [T, D] on
    `device`) with `cand` as that kernel's tile and the table's for the others."""
    table = blocks.choose
    blocks.choose = lambda k, k_p, dtype: cand if k == kernel else table(k, k_p, dtype)
    try:
        recorded = aot._drive_shape(case, outs, t, d, outs[0], device)
    finally:
        blocks.choose = table
    return [rec for rec in recorded if rec[0].__name__ == f"_{kernel}_kernel"]


def replay(launches: list):
    """A function launching `launches` as recorded; it returns their builds (None each when interpreted)."""
    def run():
        return [k[grid](*args, **consts, num_warps=blk.num_warps, num_stages=blk.num_stages)
                for k, grid, args, consts, blk in launches]

    return run


def time_ms(fn, device: str) -> float:
    """Median ms of fn: CUDA events through `triton.testing.do_bench` on a GPU, process time of one call on CPU."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    t0 = time.process_time()
    fn()
    return (time.process_time() - t0) * 1e3


def resources(builds: list) -> tuple[int | None, int | None]:
    """(most registers, most local + stack bytes) over the builds a replay returned, read from their cubins as the
    AOT matrix reads them (`_aot.resource_usage`); Triton's own n_regs / n_spills where cuobjdump cannot run;
    (None, None) when interpreted."""
    regs, spills = [], []
    for b in builds:
        if b is None or not hasattr(b, "asm"):
            return None, None
        try:
            use = aot.resource_usage(b.asm["cubin"])
            regs.append(use.registers)
            spills.append(use.local + use.stack)
        except Exception:  # no cuobjdump here: Triton's figures (spill stores only, no stack)
            regs.append(b.n_regs)
            spills.append(b.n_spills)
    return (max(regs), max(spills)) if regs else (None, None)


def tune_kernel(kernel: str, case: aot.Case, shapes, groups: int, device: str, budget: bc.Budget,
                limit: int | None) -> list[dict]:
    """A row per (shape, candidate) of `kernel` for `case`, `groups` sites of O = D."""
    dclass = blocks.dtype_class(aot.DTYPES[case.dtype])
    k_p = blocks.padded_columns(case.e, case.r)
    current = blocks.choose(kernel, k_p, aot.DTYPES[case.dtype])
    cands = list(blocks.CANDIDATES[(kernel, dclass)])[:limit]
    if current not in cands:
        cands.insert(0, current)
    rows = []
    for t, d in shapes:
        for cand in cands:
            if not budget.allows(3, f"{kernel} {t}x{d} {_label(cand)} and what follows it"):
                return rows
            row = {"kernel": kernel, "T": t, "D": d, "G": groups, "K_P": k_p, "dtype": case.dtype,
                   "candidate": _label(cand), "current": cand == current}
            try:
                fn = replay(launches_with(kernel, cand, case, (d,) * groups, t, d, device))
                # a GPU's first call compiles the builds, whose resources it returns; interpreted, there are none
                row["registers"], row["spills"] = resources(fn()) if device == "cuda" else (None, None)
                row["ms"] = time_ms(fn, device)
            except Exception as exc:  # a build that fails (shared memory, a compile error): noted, not proposed
                row["error"] = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            rows.append(row)
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def _label(b: blocks.Blocks) -> str:
    return f"BT{b.bt} BD{b.bd} w{b.num_warps} s{b.num_stages}" + (f" bk{b.bk}" if b.bk else "")


def proposals(rows: list[dict]) -> list[dict]:
    """Per (kernel, K_P, G): the fastest candidate that timed every shape without spills or errors, against the
    current tile (both summed over the shapes)."""
    out = []
    for key in dict.fromkeys((r["kernel"], r["K_P"], r["G"]) for r in rows):
        mine = [r for r in rows if (r["kernel"], r["K_P"], r["G"]) == key]
        shapes = {(r["T"], r["D"]) for r in mine}
        totals = {}
        for cand in dict.fromkeys(r["candidate"] for r in mine):
            got = [r for r in mine if r["candidate"] == cand and "ms" in r and not r.get("spills")]
            if {(r["T"], r["D"]) for r in got} == shapes:
                totals[cand] = sum(r["ms"] for r in got)
        current = next((r["candidate"] for r in mine if r["current"]), None)
        if not totals or current not in totals:
            out.append({"kernel": key[0], "K_P": key[1], "G": key[2], "current": current, "best": None,
                        "x current": None})
            continue
        best = min(totals, key=totals.get)
        out.append({"kernel": key[0], "K_P": key[1], "G": key[2], "current": current, "best": best,
                    "current ms": totals[current], "best ms": totals[best],
                    "x current": totals[best] / totals[current]})
    return out


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, interpreted, 2 candidates (CI)")
    ap.add_argument("--budget", type=float, default=240, help="seconds for the whole run")
    ap.add_argument("--shapes", default=None, help="T x D (= O) list, e.g. 8192x4096,2048x1024")
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--experts", type=_ints, default=(8,))
    ap.add_argument("--ranks", type=_ints, default=(4,))
    ap.add_argument("--groups", type=_ints, default=(1,), help="sites per launch (3: a linked q, k, v)")
    ap.add_argument("--method", default="adamole")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON / CSV here, not into benchmarks/results")
    args = ap.parse_args()
    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu-smoke")
    plan = SMOKE if args.cpu_smoke else FULL
    shapes = (tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
              if args.shapes else plan["shapes"])
    budget = bc.Budget(args.budget)
    rows = []
    for e in args.experts:
        for r in args.ranks:
            case = aot.Case(plan["dtype"], args.method, e, r, True)  # dropout on: the keep-mask's loads too
            for g in args.groups:
                for kernel in args.kernels.split(","):
                    rows += tune_kernel(kernel, case, shapes, g, device, budget, plan.get("candidates"))
    best = proposals(rows)
    result = {"device": bc.device_name(device), "commit": bc.commit(), **bc.versions(), "shapes": shapes,
              "rows": rows, "proposals": best, "notes": budget.notes,
              "seconds": args.budget - budget.left()}
    keys = ["kernel", "T", "D", "G", "K_P", "candidate", "current", "ms", "registers", "spills", "error"]
    print(bc.table([[_fmt(r.get(k)) for k in keys] for r in rows], keys), "\n")
    pkeys = ["kernel", "K_P", "G", "current", "best", "current ms", "best ms", "x current"]
    print(bc.table([[_fmt(p.get(k)) for k in pkeys] for p in best], pkeys))
    for note in budget.notes:
        print("note:", note)
    written = bc.write_results("tune_blocks", result, rows, args.out)
    print(f"{result['device']}, {result['seconds']:.0f} s; wrote", ", ".join(map(str, written)))


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main()
