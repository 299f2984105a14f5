"""One GPU check in one call, under 5 minutes on an H100 / H200 (issue 21): layer fwd + bwd and a real-shape training
step, AdaMoLE against LoRA, each contender side by side in one run.

    python benchmarks/gpu_check.py [--budget 270]      # from a repo checkout; needs torch + triton only
    python benchmarks/gpu_check.py --cpu-smoke         # tiny shapes on CPU (CI: the script does not crash)

layer   D x T = 4096 x 8192 and 1024 x 2048, bf16: frozen linear, + LoRA(32) (plain torch), + AdaMoLE (E=8 r=4,
        dropout 0.05) on the Triton path and on the torch path (`AdaMoLEConfig.kernels`), and the Triton path
        without the fold of the frozen projection into the op ("unfolded": its gain). Per contender: wall ms
        (median, synchronised), host enqueue ms (issuing fwd + bwd, no sync), the torch profiler's CUDA ms and
        kernel count for one fwd + bwd, and its 8 costliest kernels by name (which to tune first).
train   Llama h2048, 8 layers, 16 heads, intermediate 5632, vocab 32000, seq 1024, batch 4, bf16 (from LlamaConfig,
        no download): AdaMoLE (transform, E=8 r=4 on q, k, v, o) against PEFT LoRA r=32 (or a plain-torch LoRA
        when peft is missing), eager, torch.compile and torch.compile(mode="reduce-overhead") of each decoder layer
        (`--whole-model`: of the whole loss): tokens/s. Compiled, AdaMoLE also runs its torch path
        (kernels="torch", fused by inductor): "amole" against "amole torch path" is the measurement that sets
        which path a compiled 'auto' call takes on a GPU (`amole_compile.kernels.backend.COMPILED_AUTO`).

launch  host µs per launch, back to back without a sync: one of the op's Triton kernels through `kernel[grid]`
        (Triton's Python dispatch: `JITFunction.run`), the same through a kept build (`kernels/direct.py`, as
        the eager op launches them once warm), and an ATen op on the same tensor. A site launches 7 Triton
        kernels a training step.

Each section has a time guard: what would overrun the budget is skipped with a note. Writes gpu_check.json and
gpu_check.csv (this run's rows) to benchmarks/results/ and to $OUT when set; appends to results/gpu_check_rows.csv.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import amole_compile as ac
from amole_compile.model.projection import AdaMoLELinear

import _common as bc

if "--cpu-smoke" in sys.argv:  # before triton defines the kernels (imported lazily): they run on CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"

ROLES = ["q_proj", "k_proj", "v_proj", "o_proj"]
FULL = {"layer": [(4096, 8192), (1024, 2048)], "llama": dict(hidden=2048, layers=8, heads=16, inter=5632,
                                                            vocab=32000, seq=1024, batch=4)}
SMOKE = {"layer": [(64, 64)], "llama": dict(hidden=64, layers=2, heads=2, inter=172, vocab=1000, seq=16, batch=2)}


class LoraLinear(nn.Module):
    """PEFT's LoRA layer in plain torch: base(x) + B(A(dropout(x))) * scale."""

    def __init__(self, base: nn.Module, rank: int = 32, dropout: float = 0.05) -> None:
        super().__init__()
        w = base.weight
        self.base_layer, self.drop = base, nn.Dropout(dropout)
        self.lora_A = nn.Linear(w.shape[1], rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        nn.init.normal_(self.lora_B.weight, std=0.01)
        self.scale = 16.0 / rank

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(self.drop(x))) * self.scale


class Unfolded(nn.Module):
    """An AdaMoLE layer run without the fold (`AdaMoLELinear.folding_group`): the projection as its own module,
    then `add_to`: two autograd nodes, and x's two gradients summed by autograd. The fold's gain, side by side."""

    def __init__(self, layer: AdaMoLELinear) -> None:
        super().__init__()
        self.layer = layer

    @property
    def group(self):
        return self.layer.group

    def forward(self, x):
        return self.layer.add_to(x, self.layer.base_layer(x))


def amole_config(kernels: str = "auto") -> ac.AdaMoLEConfig:
    return ac.AdaMoLEConfig(num_experts=8, rank=4, dropout=0.05, kernels=kernels)


# ---- layer ------------------------------------------------------------------------------------------------------

def layer_contenders(d: int, device: str, dtype: torch.dtype) -> dict:
    base = nn.Linear(d, d, bias=False, device=device, dtype=dtype).requires_grad_(False)
    out = {"frozen linear": base, "+ lora32": LoraLinear(base)}
    for kernels in ("triton", "torch"):
        layer = AdaMoLELinear(base, ("q",), (tuple(range(d)),), amole_config(kernels))
        nn.init.normal_(layer.group["q"].lora_B, std=0.01)
        out[f"+ amole {kernels}"] = layer
    out["+ amole triton unfolded"] = Unfolded(out["+ amole triton"])
    return {k: v.train() for k, v in out.items()}


def host_ms(fn, device: str, reps: int) -> float:
    """Median ms to issue fn (no sync inside the timed span)."""
    times = []
    for _ in range(reps):
        bc.sync(device)
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        bc.sync(device)
    return sorted(times)[len(times) // 2] * 1e3


def profiled(fn, device: str) -> tuple[float | None, int | None, str | None]:
    """(CUDA ms, kernels, the costliest kernels as "name=µs ...") of one call under torch.profiler; Nones on
    CPU. The breakdown says which of the op's kernels to tune first."""
    if not device.startswith("cuda"):
        return None, None, None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        bc.sync(device)
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in kernels) / 1e3, len(kernels), top_kernels(kernels)


def top_kernels(events, n: int = 8) -> str:
    """The n kernels of most CUDA time, by name (summed over launches): "name=µs ..." (names cut to 40)."""
    by_name: dict[str, float] = {}
    for e in events:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us()
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:n]
    return " ".join(f"{name[:40].replace(' ', '_')}={us:.0f}" for name, us in top)


def layer_section(sizes, device: str, dtype, budget: bc.Budget, steps: int, warmup: int = 3) -> list[dict]:
    rows = []
    for d, t in sizes:
        if not budget.allows(15, f"layer {d}x{t}"):
            continue
        try:
            rows += layer_size(d, t, device, dtype, steps, warmup)
        except Exception as e:  # one size failing (a kernel compile) must not lose the rest
            budget.notes.append(f"layer {d}x{t} failed: {type(e).__name__}: {e}"[:500])
            traceback.print_exc()
    return rows


def layer_size(d: int, t: int, device: str, dtype, steps: int, warmup: int = 3) -> list[dict]:
    """The layer contenders at D x T, side by side (`warmup` untimed calls each first): wall / host / profiled
    CUDA ms, kernels."""
    torch.manual_seed(0)
    x = torch.randn(t, d, device=device, dtype=dtype, requires_grad=True)  # [T, D]
    grad = torch.randn(t, d, device=device, dtype=dtype)  # [T, O]
    fns = {k: bc.site_fwd_bwd(v, x, grad) for k, v in layer_contenders(d, device, dtype).items()}
    wall = bc.interleaved(fns, steps, warmup, device)
    rows = []
    for name, fn in fns.items():
        cuda_ms, kernels, top = profiled(fn, device)
        rows.append({"section": "layer", "D": d, "T": t, "contender": name, "wall ms": wall[name] * 1e3,
                     "host ms": host_ms(fn, device, steps), "cuda ms": cuda_ms, "kernels": kernels,
                     "x lora32": wall[name] / wall["+ lora32"], "top kernels us": top})
    return rows


# ---- launch path -------------------------------------------------------------------------------------------------

def launch_section(device: str, budget: bc.Budget, reps: int) -> list[dict]:
    """Host µs per launch (median of 5 rounds of `reps` back-to-back calls): the op's reduce kernel through
    `kernel[grid]` and through a kept build (`kernels/direct.py`), against `torch.add(out=)` on the same [n]
    float32 tensor."""
    if not budget.allows(10, "launch"):
        return []
    from amole_compile.kernels import triton_common
    from amole_compile.kernels.adapter_triton_bwd import _bwd_reduce_kernel
    from amole_compile.kernels.blocks import Blocks
    from amole_compile.kernels.plans import Launch

    n = 4096 if device.startswith("cuda") else 256
    src, dst = torch.zeros(n, device=device), torch.empty(n, device=device)  # [n] float32

    # grad_A = the one split of `src`; no router rows, no threshold bias
    plan = Launch((n // 256,), {"BLOCK": 256, "GROUPED": False}, Blocks(bt=1, bd=256, num_warps=4, num_stages=1))
    args = (src, src, src, dst, src, src, src, 1, n, 0, 0, 1, 0)

    def triton_launch() -> None:  # Triton's own dispatch every call
        _bwd_reduce_kernel[plan.grid](*args, **plan.kwargs)

    def kept_build() -> None:  # as the eager op launches: a kept build after the first (`direct`; not interpreted)
        triton_common.launch(_bwd_reduce_kernel, plan, args, wrap=False)

    def aten_launch() -> None:
        torch.add(src, src, out=dst)

    rows = []
    for name, fn in (("triton kernel[grid]", triton_launch), ("triton kept build", kept_build),
                     ("aten add", aten_launch)):
        for _ in range(3):
            fn()
        bc.sync(device)
        rounds = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            rounds.append((time.perf_counter() - t) / reps)
            bc.sync(device)
        rows.append({"section": "launch", "contender": name, "host us per launch": sorted(rounds)[2] * 1e6})
    return rows


# ---- training step ----------------------------------------------------------------------------------------------

def llama(shape: dict, device: str, dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["heads"], max_position_embeddings=max(2048, shape["seq"]),
                      use_cache=False)
    with torch.device(device):  # initialised where it runs: seconds, not a minute, for 0.5 B parameters
        return AutoModelForCausalLM.from_config(cfg).to(dtype)


def lora_model(base: nn.Module) -> tuple[nn.Module, str]:
    """PEFT LoRA r=32 on q, k, v, o; a plain-torch LoRA when peft is not installed."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        model = copy.deepcopy(base).requires_grad_(False)
        for name, mod in list(model.named_modules()):
            if name.rsplit(".", 1)[-1] in ROLES:
                parent, child = name.rsplit(".", 1)
                setattr(model.get_submodule(parent), child, LoraLinear(mod))
        return model, "lora32 (plain torch: peft missing)"
    cfg = LoraConfig(r=32, lora_alpha=16, lora_dropout=0.05, target_modules=ROLES)
    return get_peft_model(copy.deepcopy(base), cfg), "peft lora32"


def train_step(model: nn.Module, ids: torch.Tensor, mode: str, whole: bool = False):
    """forward with labels (AdaMoLE's loss holds its aux term), backward, AdamW. Compiled modes compile each decoder
    layer (regional compilation: one graph for all layers, seconds to compile), or the whole loss with `whole`."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    kw = {"mode": "reduce-overhead"} if mode == "reduce-overhead" else {}

    def loss_fn(x):
        return model(input_ids=x, labels=x).loss

    fwd = torch.compile(loss_fn, **kw) if mode != "eager" and whole else loss_fn
    if mode != "eager" and not whole:
        for layer in [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]:
            layer.compile(**kw)

    def step() -> None:
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        fwd(ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


MODE_NEED_S = {"eager": 20, "compile": 120, "reduce-overhead": 90}  # all contenders, compiles included (a guess)
TORCH_PATH = "amole torch path"  # compile mode's third contender: AdaMoLE with kernels="torch"


def train_section(shape: dict, device: str, dtype, budget: bc.Budget, modes, steps: int, whole: bool) -> list[dict]:
    try:
        base = llama(shape, device, dtype)
    except ImportError as e:
        budget.notes.append(f"skipped train: transformers missing ({e})")
        return []
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), device=device)
    tokens, rows = shape["batch"] * shape["seq"], []
    raise_recompile_limits()
    for mode in modes:
        if not budget.allows(MODE_NEED_S[mode], f"train {mode}"):
            continue
        try:
            rows += train_mode(base, ids, mode, device, steps, tokens, whole)
        except Exception as e:  # one mode failing (a compile error) must not lose the others' figures
            budget.notes.append(f"train {mode} failed: {type(e).__name__}: {e}"[:500])
            traceback.print_exc()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def train_mode(base, ids, mode: str, device: str, steps: int, tokens: int, whole: bool) -> list[dict]:
    """AdaMoLE and LoRA side by side in one mode: warm-up (compiles; CUDA graphs record on a later call), then
    interleaved timed steps."""
    torch.manual_seed(0)
    lora, lora_name = lora_model(base)
    models = {"amole": ac.transform(copy.deepcopy(base), amole_config())}
    if mode == "compile":  # inductor's own fusion of the op's torch path: what decides backend.COMPILED_AUTO
        models[TORCH_PATH] = ac.transform(copy.deepcopy(base), amole_config("torch"))
    models[lora_name] = lora
    fns = {k: train_step(m, ids, mode, whole) for k, m in models.items()}
    warm = {k: warm_up(fn, 1 if mode == "eager" else 3) for k, fn in fns.items()}
    times = bc.interleaved(fns, steps, 1, device)
    rows = [{"section": "train", "mode": mode, "contender": k, "ms/step": t * 1e3, "tokens/s": tokens / t,
             "x lora": t / times[lora_name], **warm[k]} for k, t in times.items()]
    del models, fns
    return rows


def warm_up(fn, calls: int) -> dict:
    """Run fn `calls` times (compiles, CUDA graph recording) -> seconds taken, graphs compiled, cudagraph skips."""
    from torch._dynamo.utils import counters

    graphs, skips = counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return {"warmup s": time.perf_counter() - t0, "graphs": counters["stats"]["unique_graphs"] - graphs,
            "cudagraph skips": counters["inductor"]["cudagraph_skips"] - skips}


def raise_recompile_limits() -> None:
    """Two models' decoder layers share one forward's code: room for every graph they need."""
    import torch._dynamo.config as dc

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), 256))


# ---- output -----------------------------------------------------------------------------------------------------

def write(result: dict, rows: list[dict], out: Path | None) -> list[Path]:
    """gpu_check.json / .csv into `out` (else benchmarks/results, rows appended to results/gpu_check_rows.csv)
    and into $OUT when set."""
    return bc.write_results("gpu_check", result, rows, out)


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, eager only (CI)")
    ap.add_argument("--budget", type=float, default=270, help="seconds for the whole run (sections skip past it)")
    ap.add_argument("--sections", default="launch,layer,train")
    ap.add_argument("--modes", default=None, help="train modes (default eager,compile,reduce-overhead; smoke: eager)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 layer / 5 train; smoke 2)")
    ap.add_argument("--whole-model", action="store_true", help="compile the whole loss, not each decoder layer")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON / CSV here, not into benchmarks/results")
    args = ap.parse_args()
    budget = bc.Budget(args.budget)
    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu-smoke")
    if os.environ.pop("AMOLE_KERNELS", None):
        budget.notes.append("AMOLE_KERNELS was set: ignored, each contender names its kernels")
    shapes = SMOKE if args.cpu_smoke else FULL
    modes = (args.modes or ("eager" if args.cpu_smoke else "eager,compile,reduce-overhead")).split(",")
    sections = args.sections.split(",")
    dtype = torch.bfloat16
    rows, spent = [], {}
    if "launch" in sections:
        rows += launch_section(device, budget, 20 if args.cpu_smoke else 500)
    if "layer" in sections:
        t0 = time.perf_counter()
        rows += layer_section(shapes["layer"], device, dtype, budget, args.steps or (2 if args.cpu_smoke else 20),
                              1 if args.cpu_smoke else 3)  # (CPU: each interpreted AdaMoLE call takes ~2 s)
        spent["layer"] = time.perf_counter() - t0
    if "train" in sections:
        t0, steps = time.perf_counter(), args.steps or (2 if args.cpu_smoke else 5)
        rows += train_section(shapes["llama"], device, dtype, budget, modes, steps, args.whole_model)
        spent["train"] = time.perf_counter() - t0
    result = {"device": bc.device_name(device), "commit": bc.commit(), **bc.versions(), "llama": shapes["llama"],
              "compile": "whole loss" if args.whole_model else "per decoder layer",
              "rows": rows, "notes": budget.notes, "seconds": args.budget - budget.left(), "section seconds": spent}
    for section in ("launch", "layer", "train"):
        part = [r for r in rows if r["section"] == section]
        if part:
            keys = [k for k in part[0] if k not in ("section", "top kernels us")]
            print(bc.table([[fmt(r.get(k)) for k in keys] for r in part], keys), "\n")
    for r in rows:
        if r.get("top kernels us"):
            print(f"costliest kernels, layer {r['D']}x{r['T']} {r['contender']} (µs): {r['top kernels us']}")
    for note in budget.notes:
        print("note:", note)
    print(f"{result['device']}, {result['seconds']:.0f} s; wrote", ", ".join(map(str, write(result, rows, args.out))))


if __name__ == "__main__":
    main()
