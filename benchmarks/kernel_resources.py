"""Registers, shared memory and spills of every Triton kernel specialisation the launchers produce, compiled ahead
of time for sm_80 (A100) and sm_90 (H100) on this machine (no GPU needed): `amole_compile/kernels/_aot.py`.

    python benchmarks/kernel_resources.py [--dtypes float32,bfloat16,float16] [--methods adamole,mole,lora]
                                          [--experts 1,2,4,8,16] [--ranks 1,4,8,16,32,64] [--archs 80,90]
                                          [--jobs 2] [--all-rows]
    python benchmarks/kernel_resources.py --search [--kernels fwd,bwd_route] [--k-p 128,256]  # re-derive blocks.TABLE

--kernels names kernels without their underscores and `_kernel` (fwd, fwd_finish, bwd_route, ...): the matrix
builds only theirs (default: every kernel), --search searches only their rows (default: the four tiled kernels,
`blocks.KERNEL_NAMES`).

Prints one row per build that spills or overflows shared memory (every build with --all-rows), then the maximum
registers and shared memory per kernel and arch, and appends a summary row to results/kernel_resources.csv.
Exits 1 when a build spills or needs more shared memory than a block may opt into (163 KB sm_80, 227 KB sm_90).

--search tries, for each (kernel, K_P, dtype) row of `blocks.TABLE`, the candidate configurations in order and
prints the first that fits every case of that row on both archs (what `blocks.TABLE` should say).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile the kernels as JIT functions, not interpreted ones
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning

sys.path.insert(0, str(Path(__file__).parent))
from amole_compile.kernels import _aot as aot
from amole_compile.kernels import blocks

import _common as bc

_SPECS: list = []  # forked workers read the specialisations from here (JIT functions do not pickle)


def _measure(job: tuple[int, int]):
    i, arch = job
    spec = _SPECS[i]
    try:
        usage = aot.measure(spec, arch)
    except Exception as exc:  # a compile error is a finding too
        return i, arch, None, f"compile error: {str(exc).splitlines()[0][:120]}"
    return i, arch, usage, "; ".join(aot.problems(usage, arch, spec))


def _csv_list(text: str, kind=str) -> tuple:
    return tuple(kind(v) for v in text.split(",") if v)


def _k_p(consts: dict) -> int:
    """The padded adapter columns of a build (0 for the reduce kernel)."""
    return consts.get("K_P") or consts.get("E_P", 0) * consts.get("R_P", 0)


def _describe(spec) -> str:
    c = spec.consts
    blk = " ".join(f"{k}={c[k]}" for k in ("BT", "BD", "BO", "BLOCK") if k in c)
    k_p = _k_p(c) or "-"
    return f"{spec.name:<18} {spec.label():<42} K_P={k_p:<5} {blk} w={spec.num_warps} s={spec.num_stages}"


def kernel_name(spec) -> str:
    """A build's kernel as --kernels names it: `_bwd_route_kernel` -> `bwd_route`."""
    return spec.name.strip("_").removesuffix("_kernel")


def only_kernels(specs: list, names: tuple | None) -> list:
    """The specialisations of the kernels `names` (None: all); a name no specialisation has raises, listing the
    names there are (a typo must not build nothing and report no problem)."""
    if names is None:
        return specs
    there = sorted({kernel_name(s) for s in specs})
    unknown = [n for n in names if n not in there]
    if unknown:
        raise SystemExit(f"--kernels: no kernel named {', '.join(unknown)}; the matrix has {', '.join(there)}")
    return [s for s in specs if kernel_name(s) in names]


def run_matrix(args) -> int:
    matrix = aot.cases(args.dtypes, args.methods, args.experts, args.ranks, args.dropouts)
    _SPECS[:] = only_kernels(aot.specialisations(matrix), args.kernels)
    jobs = [(i, arch) for i in range(len(_SPECS)) for arch in args.archs]
    print(f"{len(matrix)} op configurations -> {len(_SPECS)} kernel specialisations x {len(args.archs)} archs "
          f"= {len(jobs)} builds")
    start, bad, worst, shared = time.time(), 0, defaultdict(lambda: [0, 0, 0]), defaultdict(int)
    with mp.Pool(args.jobs) as pool:
        for i, arch, usage, problem in pool.imap_unordered(_measure, jobs):
            spec = _SPECS[i]
            if usage is not None:
                w = worst[(spec.name, arch)]
                w[0], w[1], w[2] = max(w[0], usage.registers), max(w[1], usage.shared), w[2] + usage.spills
                cls, k_p, listed = aot.shared_row(spec)
                shared[(cls, k_p, listed)] = max(shared[(cls, k_p, listed)], usage.shared)
            bad += bool(problem)
            if problem or args.all_rows:
                reg = "-" if usage is None else f"REG {usage.registers:3d} SHARED {usage.shared:6d} " \
                                                 f"LOCAL {usage.local} STACK {usage.stack}"
                print(f"sm_{arch} {_describe(spec)}  {reg}  {problem or 'ok'}", flush=True)
    secs = time.time() - start
    rows = [[name, f"sm_{arch}", str(w[0]), f"{w[1] / 1024:.1f}", str(w[2])]
            for (name, arch), w in sorted(worst.items())]
    print(bc.table(rows, ["kernel", "arch", "max REG", "max shared KB", "builds spilling"]))
    print("most shared memory per block by the op's K_P (what blocks.SHARED_BYTES lists; a build above its row is a "
          "problem above)")
    print(bc.table([[cls, k_p, n, listed] for (cls, k_p, listed), n in sorted(shared.items())],
                   ["dtype class", "K_P", "measured B", "listed B"]))
    print(f"{len(jobs)} builds in {secs:.0f} s, {bad} with a problem")
    bc.append_row("kernel_resources", {
        "device": bc.device_name("cpu"), "builds": len(jobs), "specialisations": len(_SPECS),
        "dtypes": " ".join(args.dtypes), "methods": " ".join(args.methods),
        "experts": " ".join(map(str, args.experts)), "ranks": " ".join(map(str, args.ranks)),
        "archs": " ".join(map(str, args.archs)), "kernels": " ".join(args.kernels or ("all",)), "problems": bad,
        "max registers": max(w[0] for w in worst.values()) if worst else 0,
        "max shared bytes": max(w[1] for w in worst.values()) if worst else 0,
        "spilling builds": sum(w[2] for w in worst.values()), "seconds": round(secs)})
    return 1 if bad else 0


def _search_group(key: tuple) -> tuple:
    """First candidate of blocks.CANDIDATES that fits every case of one (kernel, K_P, dtype) row on every arch."""
    kernel, k_p, dtype_name, archs, matrix = key
    for cand in blocks.CANDIDATES[(kernel, blocks.dtype_class(aot.DTYPES[dtype_name]))]:
        blocks.choose = lambda k, kp, dt, cand=cand: cand  # every launch of the driven cases uses cand
        specs = [s for s in aot.specialisations(matrix) if s.name == f"_{kernel}_kernel"
                 and _k_p(s.consts) == k_p]
        fails = []
        for spec in specs:
            for arch in archs:
                try:
                    fails += aot.problems(aot.measure(spec, arch), arch)
                except Exception as exc:
                    fails.append(f"compile error {str(exc).splitlines()[0][:60]}")
                if fails:
                    break
            if fails:
                break
        if not fails:
            return kernel, k_p, dtype_name, cand, len(specs)
        print(f"  {kernel} K_P={k_p} {dtype_name}: {cand} fails ({fails[0]})", flush=True)
    return kernel, k_p, dtype_name, None, 0


def run_search(args) -> int:
    matrix = aot.cases(args.dtypes, args.methods, args.experts, args.ranks, args.dropouts)
    by_kp = defaultdict(list)
    for case in matrix:
        by_kp[(blocks.padded_columns(case.e, case.r), case.dtype)].append(case)
    groups = [(k, kp, dt, args.archs, cases) for k in args.kernels or blocks.KERNEL_NAMES
              for (kp, dt), cases in sorted(by_kp.items()) if not args.k_p or kp in args.k_p]
    with mp.Pool(args.jobs) as pool:
        for kernel, k_p, dt, cand, n in pool.imap_unordered(_search_group, groups):
            print(f"{kernel:<10} K_P={k_p:<5} {dt:<9} -> {cand} ({n} specialisations)", flush=True)
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", type=_csv_list, default=tuple(aot.DTYPES))
    ap.add_argument("--methods", type=_csv_list, default=("adamole", "mole", "lora"))
    ap.add_argument("--experts", type=lambda s: _csv_list(s, int), default=aot.EXPERTS)
    ap.add_argument("--ranks", type=lambda s: _csv_list(s, int), default=aot.RANKS)
    ap.add_argument("--dropouts", type=lambda s: _csv_list(s, lambda v: v == "1"), default=(False, True))
    ap.add_argument("--archs", type=lambda s: _csv_list(s, int), default=aot.ARCHS)
    ap.add_argument("--kernels", type=_csv_list, default=None,
                    help="only these kernels (fwd, bwd_route, ...; default: all, --search: the four tiled ones)")
    ap.add_argument("--k-p", type=lambda s: _csv_list(s, int), default=(), help="--search: only these K_P")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--all-rows", action="store_true", help="print every build, not only the failing ones")
    ap.add_argument("--search", action="store_true", help="find the first fitting candidate per blocks.TABLE row")
    args = ap.parse_args()
    sys.exit(run_search(args) if args.search else run_matrix(args))


if __name__ == "__main__":
    main()
