"""What a GPU would see of one adapted site's training forward + backward, counted on a CPU (no GPU needed), per
method against PEFT's LoRA layer; the host time of a tiny Llama training step with kernel launches stubbed; and
the programs of every Triton launch over real T x D shapes against the H100's 132 SMs (issue 21).

    python benchmarks/host_overhead.py [--tokens 64 --dim 64] [--steps 30] [--no-run-kernels]

Per site (bf16, E=8 r=4 for adamole / mole, E=1 r=32 for lora, dropout 0.05, x requiring grad, the aux loss's
gradient included; PEFT: `peft.tuners.lora.Linear` r=32 on the same nn.Linear): kernel-launching ATen ops, Triton
launches, new allocations, zero-filled allocations a kernel then overwrites entirely, host syncs
(`benchmarks/_counting.py` says what counts). The Triton path is forced (`kernels="triton"`, TRITON_INTERPRET=1);
kernels run in the interpreter so that the overwrite check can look at their outputs.

Host-time ratio: a Llama (hidden 64, 4 layers, seq 8, batch 2, bf16) training step, AdaMoLE (`transform`) over
PEFT LoRA r=32, Triton launches stubbed, process CPU time on one torch thread, alternating (which runs first
alternates too), the median of the per-pair ratios; and the same without AdamW (forward, backward, zero_grad).
A stubbed launch costs nothing there. Both again in float32: this CPU has no bf16 arithmetic, so each small bf16
GEMM costs it 10-130 us of compute (a GPU's host enqueues one in a few), which dilutes the bf16 ratio with time
both sides spend alike; float32's GEMMs cost 6-9 us, near the host's own cost per op. Then the step again in a
subprocess with the kernels compiled for sm_90 and Triton's own host path run up to its C launcher
(`_triton_host.py`: the driver stood in for), launched through `JITFunction.run` every time, and through
`kernels/direct.py`'s kept builds (issue 21: "compiled kernels launched without Triton's Python dispatch").
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from _counting import counting, kernels_interpreted, triton_hooked

import amole_compile as ac
from amole_compile.model.projection import AdaMoLELinear

import _common as bc

METHODS = ("adamole", "mole", "lora")
SITES = METHODS + ("peft lora", "frozen linear")
GRID_SHAPES = ((1024, 512), (1024, 4096), (8192, 512), (8192, 4096))  # (T, D = O)
SMS = 132  # H100 SXM
AUX_COEF = 1e-3


def method_config(method: str, kernels: str = "triton") -> ac.AdaMoLEConfig:
    """E=8 r=4 (lora: one expert of rank 32: the same total rank), dropout 0.05."""
    e, r = (1, 32) if method == "lora" else (8, 4)
    return ac.AdaMoLEConfig(method=method, num_experts=e, rank=r, dropout=0.05, kernels=kernels)


def site(name: str, d: int, dtype: torch.dtype) -> nn.Module:
    """One adapted d x d projection (train mode, B nonzero) of kind `name` (see SITES)."""
    base = nn.Linear(d, d, bias=False, dtype=dtype).requires_grad_(False)
    if name == "frozen linear":
        return base
    if name == "peft lora":
        from peft import LoraConfig
        from peft.tuners.lora import Linear

        cfg = LoraConfig(r=32, lora_alpha=16, lora_dropout=0.05)
        layer = Linear(base, "default", config=cfg, r=32, lora_alpha=16, lora_dropout=0.05)
        nn.init.normal_(layer.lora_B["default"].weight, std=0.01)
        return layer.train()
    layer = AdaMoLELinear(base, ("q",), (tuple(range(d)),), method_config(name))
    nn.init.normal_(layer.group["q"].lora_B, std=0.01)
    return layer.train()


def cpu_triton():
    """Within: kernels='triton' accepts CPU tensors (TRITON_INTERPRET=1 is read per call). The kernels run only if
    they were defined under it (`kernels_interpreted()`); otherwise keep their launches stubbed."""
    from amole_compile.kernels import adapter_triton  # noqa: F401  defined as the session has them, not interpreted

    return mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"})


def count_site(name: str, t: int, d: int, dtype: torch.dtype = torch.bfloat16, run_kernels: bool = True):
    """-> the `Counter` of one training fwd + bwd of site `name` (after one uncounted warm-up call)."""
    torch.manual_seed(0)
    layer = site(name, d, dtype)
    x = torch.randn(t, d, dtype=dtype, requires_grad=True)  # [T, D]
    grad = torch.randn(t, d, dtype=dtype)  # [T, O]
    return _counted(bc.site_fwd_bwd(layer, x, grad, AUX_COEF), run_kernels)


def count_fused(t: int, d: int, dtype: torch.dtype = torch.bfloat16, run_kernels: bool = True):
    """-> the `Counter` of one training fwd + bwd of a fused q | k | v projection (one nn.Linear d -> 2d, as Phi-3's
    qkv_proj): AdaMoLE's three roles (d, d/2 and d/2 columns) in the projection's one folded op."""
    torch.manual_seed(0)
    base = nn.Linear(d, 2 * d, bias=False, dtype=dtype).requires_grad_(False)
    cols = (tuple(range(d)), tuple(range(d, d + d // 2)), tuple(range(d + d // 2, 2 * d)))
    layer = AdaMoLELinear(base, ("q", "k", "v"), cols, method_config("adamole")).train()
    for role in layer.roles:
        nn.init.normal_(layer.group[role].lora_B, std=0.01)
    x = torch.randn(t, d, dtype=dtype, requires_grad=True)  # [T, D]
    grad = torch.randn(t, 2 * d, dtype=dtype)  # [T, O]
    return _counted(bc.site_fwd_bwd(layer, x, grad, AUX_COEF), run_kernels)


def _counted(step, run_kernels: bool):
    """The `Counter` of `step()` after one uncounted warm-up call."""
    with cpu_triton():
        with triton_hooked(None):
            step()
        with counting(run_kernels=run_kernels and kernels_interpreted()) as c:
            step()
    return c


def count_siblings(name: str, t: int, d: int, dtype: torch.dtype = torch.bfloat16, run_kernels: bool = True):
    """-> the `Counter` of one training fwd + bwd of three sites of kind `name` called on the same x (an attention
    block's q, k and v); AdaMoLE's linked as `passes/find_siblings.py` links them (one op for the three)."""
    torch.manual_seed(0)
    layers = [site(name, d, dtype) for _ in range(3)]
    if isinstance(layers[0], AdaMoLELinear):
        for layer in layers:
            layer.__dict__["_siblings"] = tuple(layers)
    x = torch.randn(t, d, dtype=dtype, requires_grad=True)  # [T, D]
    grads = [torch.randn(t, d, dtype=dtype) for _ in layers]  # [T, O] each
    return _counted(bc.sites_fwd_bwd(layers, x, grads, AUX_COEF), run_kernels)


def grid_launches(method: str, t: int, d: int, dtype: torch.dtype = torch.bfloat16) -> list:
    """The Triton launches (name, grid) of a forward + backward of `method` over x [T, D], D = O, driven on meta
    tensors through the launchers (nothing computed)."""
    from amole_compile.kernels import adapter_triton

    cfg = method_config(method)
    spec, e, k = cfg.spec, cfg.num_experts, cfg.num_experts * cfg.rank
    kw = dict(device="meta", dtype=dtype)
    x, base = torch.empty(t, d, **kw), torch.empty(t, d, **kw)  # [T, D], [T, O]
    a, b = torch.empty(k, d, **kw), torch.empty(d, k, **kw)  # [K, D], [O, K]
    gate = torch.empty(e, d, **kw) if spec.has_gate else None  # [E, D]
    thr_w, thr_b = (torch.empty(1, d, **kw), torch.empty(1, **kw)) if spec.has_threshold else (None, None)
    keep = torch.empty(t, d, device="meta", dtype=torch.bool)  # [T, D]
    scalars = (method, e, cfg.k, cfg.scale, cfg.threshold_cap, 1 / 0.95)
    with counting() as c:
        _, scores, _, za, zr, aux, sums = adapter_triton.adapter_triton(x, keep, a, b, gate, thr_w, thr_b, base,
                                                                         *scalars, spec.has_gate)
        adapter_triton.adapter_backward_triton(base, None, x, keep, a, b, gate, thr_w, thr_b, za, zr, *scalars, True,
                                               aux if spec.has_gate else None, sums)
    return c.triton


def grid_table() -> list[list]:
    """Rows (method, T, D, programs per launch, fewest, goal) over GRID_SHAPES."""
    rows = []
    for method in METHODS:
        for t, d in GRID_SHAPES:
            launches = grid_launches(method, t, d)
            goal = SMS if t < 8192 else 2 * SMS
            fewest = min(x.programs for x in launches)
            rows.append([method, t, d, " ".join(f"{x.name.strip('_')}={x.programs}" for x in launches), fewest, goal])
    return rows


def tiny_llama(dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(cfg).to(dtype)


def train_step(model: nn.Module, ids: torch.Tensor):
    """-> (step: forward with labels (AdaMoLE's loss holds its aux term), backward, AdamW, zero_grad;
    fwd_bwd: the forward and backward alone; passes: forward, backward and zero_grad, the step without AdamW)."""
    model.train()
    # foreach: one op per group of tensors, as the CUDA default (CPU's default is a loop per parameter)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)

    def fwd_bwd() -> None:
        model(input_ids=ids, labels=ids).loss.backward()

    def step() -> None:
        fwd_bwd()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def passes() -> None:
        fwd_bwd()
        opt.zero_grad(set_to_none=True)

    return step, fwd_bwd, passes


def step_models(dtype: torch.dtype = torch.bfloat16) -> tuple[dict, torch.Tensor]:
    """{"amole": (step, fwd_bwd, passes), "peft lora": ...} on copies of one tiny Llama, and the batch [2, 8]."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = tiny_llama(dtype)
    ids = torch.randint(0, 1000, (2, 8))
    amole = ac.transform(copy.deepcopy(base), method_config("adamole"))
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=32, lora_alpha=16, lora_dropout=0.05,
                                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return {"amole": train_step(amole, ids), "peft lora": train_step(lora, ids)}, ids


def host_ratio(steps: int, warmup: int = 3) -> dict:
    """Median process CPU time per step of each contender (one thread, launches stubbed), and of the step without
    AdamW (`passes`: on a CPU each foreach op loops over its tensors, 5 per AdaMoLE site against PEFT's 2, where a
    GPU's multi-tensor kernels take them in a few launches); the launches and syncs of its forward + backward
    (AdamW's `.item()`s read CPU step counters, no device sync on a GPU). Then the same two ratios in float32
    ("float32"): a CPU without bf16 arithmetic computes each small bf16 GEMM in 10-130 us (a GPU's host enqueues
    it in a few), so in bf16 the step's shared GEMMs dilute the ratio; float32's cost 6-9 us, near the host's own
    cost per op (benchmarks/README.md, "Twelfth look")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # stubbed kernels leave garbage, which must not hit slow denormal paths
    try:
        with cpu_triton():
            fns, _ = step_models()
            fns32, _ = step_models(torch.float32)
        counts = {}
        with cpu_triton(), triton_hooked(None):
            for k, (step, fwd_bwd, _) in fns.items():
                step()
                with counting() as c:
                    fwd_bwd()
                step()  # (the counted fwd_bwd's gradients are dropped by this step's zero_grad)
                counts[k] = c.summary()
            times, ratio = paired(fns["amole"][0], fns["peft lora"][0], steps, warmup)
            pass_times, pass_ratio = paired(fns["amole"][2], fns["peft lora"][2], steps, warmup)
            fp32 = {"step": paired(fns32["amole"][0], fns32["peft lora"][0], steps, warmup),
                    "passes": paired(fns32["amole"][2], fns32["peft lora"][2], steps, warmup)}
    finally:
        torch.set_num_threads(threads)
    return {"times": {"amole": times[0], "peft lora": times[1]}, "ratio": ratio, "counts": counts,
            "passes": {"amole": pass_times[0], "peft lora": pass_times[1]}, "passes ratio": pass_ratio,
            "float32": fp32, "triton host path": triton_host_path(steps, warmup)}


def triton_host_path(steps: int, warmup: int = 3) -> dict:
    """The step ratio again with Triton's own host path run (`_triton_host.py`: the driver stood in for, its C
    launcher not run), in a subprocess whose kernels are compiled (for sm_90): launched through `JITFunction.run`
    every time, and through kept builds (`kernels/direct.py`). -> {"JITFunction.run": [[amole s, peft s], ratio],
    "direct": ..., "runs": JITFunction.run calls of a cold step, the next step, and a step with direct off}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, "--triton-host-path", str(steps), str(warmup)], env=env,
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode:
        raise RuntimeError(f"the Triton host path measurement failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _triton_host_path_here(steps: int, warmup: int) -> dict:
    from _triton_host import use_stand_in_driver
    from triton.runtime.jit import JITFunction

    from amole_compile.kernels import direct  # here: importing triton before main sets TRITON_INTERPRET would
    # define triton.language's own jit functions uninterpreted, and the interpreted kernels could not call them

    use_stand_in_driver()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    with cpu_triton():
        fns, _ = step_models()
    step, peft = fns["amole"][0], fns["peft lora"][0]
    runs: list = []
    run = JITFunction.run

    def counted(self, *args, **kwargs):
        runs.append(self)
        return run(self, *args, **kwargs)

    with cpu_triton():
        with mock.patch.object(JITFunction, "run", counted):
            counts = []
            for on in (True, True, False):  # cold, warm, and warm with kept builds off
                runs.clear()
                with mock.patch.object(direct, "ENABLED", on):
                    step()
                counts.append(len(runs))
        out = {"runs": dict(zip(("cold", "warm", "off"), counts, strict=True))}
        for name, on in (("JITFunction.run", False), ("direct", True)):
            with mock.patch.object(direct, "ENABLED", on):
                out[name] = paired(step, peft, steps, warmup)
    return out


def paired(a, b, steps: int, warmup: int) -> tuple[tuple[float, float], float]:
    """Process CPU seconds of a and b, alternating which runs first -> ((median a, median b), median of a / b)."""
    for _ in range(warmup):
        a(), b()
    ta, tb = [], []
    for i in range(steps):
        for fn, out in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            t = time.process_time()
            fn()
            out.append(time.process_time() - t)
    med = statistics.median
    return (med(ta), med(tb)), med(x / y for x, y in zip(ta, tb, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="T of the per-site counts")
    ap.add_argument("--dim", type=int, default=64, help="D = O of the per-site counts")
    ap.add_argument("--steps", type=int, default=30, help="timed steps of the host-time ratio")
    ap.add_argument("--no-run-kernels", action="store_true", help="stub the kernels (no overwrite check)")
    ap.add_argument("--triton-host-path", nargs=2, type=int, metavar=("STEPS", "WARMUP"),
                    help=argparse.SUPPRESS)  # internal: `triton_host_path`'s subprocess
    args = ap.parse_args()
    if args.triton_host_path:
        print(json.dumps(_triton_host_path_here(*args.triton_host_path)))
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton defines the kernels: they run on CPU tensors
    run = not args.no_run_kernels and kernels_interpreted()
    counts = {name: count_site(name, args.tokens, args.dim, run_kernels=run).summary() for name in SITES}
    keys = ("aten", "triton", "launches", "allocs", "zeroed_to_kernel", "overwritten", "syncs")
    peft = counts["peft lora"]["launches"]
    print(f"one site's training fwd + bwd, bf16, T={args.tokens} D=O={args.dim}, aux grad included "
          f"(overwrite check {'on' if run else 'off'})")
    print(bc.table([[n] + [c[k] for k in keys] + [f"{c['launches'] - peft:+d}"] for n, c in counts.items()],
                   ["site"] + list(keys) + ["launches - peft"]))
    triples = {name: count_siblings(name, args.tokens, args.dim, run_kernels=run).summary()
               for name in ("adamole", "peft lora")}
    peft3 = triples["peft lora"]["launches"]
    print("\nq, k and v on one x (three sites; AdaMoLE's linked: one op), per site")
    print(bc.table([[n] + [round(c[k] / 3, 2) for k in keys] + [f"{(c['launches'] - peft3) / 3:+.2f}"]
                    for n, c in triples.items()], ["sites"] + list(keys) + ["launches - peft"]))
    grids = grid_table()
    print(f"\nTriton programs per launch (fwd + bwd, bf16; H100: {SMS} SMs)")
    print(bc.table(grids, ["method", "T", "D=O", "programs per launch", "fewest", "goal"]))
    host = host_ratio(args.steps)
    times, ratio = host["times"], host["ratio"]
    print(f"\ntiny Llama training step (h64, 4 layers, seq 8, batch 2, bf16), launches stubbed, process CPU time, "
          f"1 thread: amole {times['amole'] * 1e3:.2f} ms, peft lora {times['peft lora'] * 1e3:.2f} ms, "
          f"median ratio {ratio:.2f}x")
    passes = host["passes"]
    print(f"the same without AdamW (forward, backward, zero_grad): amole {passes['amole'] * 1e3:.2f} ms, "
          f"peft lora {passes['peft lora'] * 1e3:.2f} ms, median ratio {host['passes ratio']:.2f}x")
    for name, ((amole, peft), r) in host["float32"].items():
        print(f"float32, {name}: amole {amole * 1e3:.2f} ms, peft lora {peft * 1e3:.2f} ms, median ratio {r:.2f}x")
    triton_path = host["triton host path"]
    for name in ("JITFunction.run", "direct"):
        (amole, peft), r = triton_path[name]
        print(f"with Triton's host path run (driver stood in for), launched through {name}: amole "
              f"{amole * 1e3:.2f} ms, peft lora {peft * 1e3:.2f} ms, median ratio {r:.2f}x")
    print(f"JITFunction.run calls per step: {triton_path['runs']}")
    keys = ("aten", "triton", "launches", "allocs", "syncs")
    print("fwd + bwd of that step:")
    print(bc.table([[n] + [c[k] for k in keys] for n, c in host["counts"].items()], ["model"] + list(keys)))
    row = {"device": bc.device_name("cpu"), "T": args.tokens, "D": args.dim, "overwrite check": int(run)}
    for name, c in counts.items():
        row.update({f"{name} {k}": c[k] for k in keys})
    for name, c in triples.items():
        row.update({f"{name} q,k,v per site {k}": round(c[k] / 3, 2) for k in keys})
    for method, t, d, _, fewest, _ in grids:
        row[f"{method} fewest programs T{t} D{d}"] = fewest
    row.update({"step amole ms": round(times["amole"] * 1e3, 3), "step peft ms": round(times["peft lora"] * 1e3, 3),
                "step ratio": round(ratio, 3), "passes amole ms": round(passes["amole"] * 1e3, 3),
                "passes peft ms": round(passes["peft lora"] * 1e3, 3), "passes ratio": round(host["passes ratio"], 3)})
    for name, ((amole, _), r) in host["float32"].items():
        row.update({f"{name} float32 amole ms": round(amole * 1e3, 3), f"{name} float32 ratio": round(r, 3)})
    for name in ("JITFunction.run", "direct"):
        (amole, _), r = triton_path[name]
        row.update({f"step triton path {name} amole ms": round(amole * 1e3, 3),
                    f"step triton path {name} ratio": round(r, 3)})
    for name, c in host["counts"].items():
        row.update({f"step {name} {k}": c[k] for k in ("launches", "allocs", "syncs")})
    print(f"appended to {bc.append_row('host_overhead', row)}")


if __name__ == "__main__":
    main()
