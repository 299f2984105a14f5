"""ONNX serving latency of a Llama-shaped model, side by side:

    ort base          the exported base model (no adapters)
    ort amole         AdaMoLE E=8 r=4 on q, k, v, o, exported with the default dense masking
    ort amole skip    the same exported with masking="skip" (each expert behind an ONNX If)
    torch amole       the AdaMoLE model in PyTorch eager

With --adapters N (N >= 2), instead the multi-adapter rows of `_multi.py`: a batch of --batch rows spread over
N named adapters in one stacked graph (`adapter_ids`) against the single-adapter graph on the same batch, and
PyTorch eager `batch_adapters` against the same batch on one adapter. Targets: <= 1.15x and <= 1.2x.

Each is timed on a prefill (batch 1, 128 tokens, empty past) and one decode step (batch 1, 1 token after a
128-token past), all through the KV-cache decoder graph. Prints medians and ratios against the exported base
model and appends a CSV row to benchmarks/results/onnx_latency.csv. Targets: ORT prefill <= 1.10x the base
model, decode step <= 1.15x.

    python benchmarks/onnx_latency.py [--hidden 1024 --layers 4 --seq 128 --experts 8 --rank 4 --steps 20]
                                      [--router-gain 1.0] [--threads N] [--onnx-dir DIR]
                                      [--adapters 4 --batch 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _decode import ort_calls, phases, torch_calls

import amole_compile as ac

import _common as bc


def llama(hidden: int, layers: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    heads = max(hidden // 64, 1)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1))
    return AutoModelForCausalLM.from_config(cfg).eval()


def adapted(base: torch.nn.Module, experts: int, rank: int, router_gain: float) -> torch.nn.Module:
    """A copy of `base` with AdaMoLE adapters whose B is nonzero, so the adapters do work. The router weights
    are scaled by `router_gain`: at init the gate is near-uniform and almost every expert clears the threshold;
    a trained router is peakier, and the gain stands in for that (it changes what skip masking can skip)."""
    import copy

    model = ac.transform(copy.deepcopy(base), ac.AdaMoLEConfig(num_experts=experts, rank=rank)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
            elif name.endswith(("gate", "threshold_weight")):
                p.mul_(router_gain)
    return model


def active_experts(model, seq: int) -> float:
    """Mean experts active per token and site, over a prefill of `seq` random tokens (PyTorch)."""
    ac.reset_expert_stats(model)
    with torch.no_grad():
        model(input_ids=torch.randint(1, 32000, (1, seq), generator=torch.Generator().manual_seed(1)))
    mean = ac.expert_stats(model).mean_active
    ac.reset_expert_stats(model)
    return mean


def ort_session(path: Path, provider: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # The sessions run round-robin: a session whose threads kept spinning after its call would slow the next one.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=[provider])


def export_all(base, model, out: Path, reuse: bool) -> dict[str, Path]:
    """The three decoder graphs (reused from `out` with --onnx-dir when already there: keep one directory per
    set of sizes / gain)."""
    jobs = {"base": (base, "dense"), "amole": (model, "dense"), "amole_skip": (model, "skip")}
    paths = {}
    for name, (m, masking) in jobs.items():
        path = out / f"{name}.onnx"
        if not (reuse and path.exists()):
            ac.export_onnx(m, path, kv_cache=True, masking=masking)
        paths[name] = path
    return paths


def measure(paths: dict, model, args, provider: str) -> dict[str, dict[str, float]]:
    """Median seconds per call. The ORT graphs run round-robin (noise hits all alike); PyTorch runs after them,
    apart, because its OpenMP threads keep spinning after each call and would slow whichever graph came next."""
    groups = [{name: ort_calls(ort_session(path, provider, args.threads), args.seq, 32000)
               for name, path in paths.items()}]
    if provider == "CPUExecutionProvider":
        groups.append({"torch_amole": torch_calls(model, args.seq, 32000)})
    return phases(groups, args.steps)


def report(times: dict, provider: str) -> dict[str, str]:
    rows, csv = [], {}
    for name in times["prefill"]:
        p, d = times["prefill"][name], times["decode"][name]
        rp, rd = p / times["prefill"]["base"], d / times["decode"]["base"]
        rows.append([name, f"{p * 1e3:.2f}", f"{rp:.3f}x", f"{d * 1e3:.3f}", f"{rd:.3f}x"])
        tag = f"{'gpu' if provider.startswith('CUDA') else 'cpu'}_{name}"
        csv.update({f"{tag}_prefill_ms": f"{p * 1e3:.3f}", f"{tag}_prefill_ratio": f"{rp:.3f}",
                    f"{tag}_decode_ms": f"{d * 1e3:.4f}", f"{tag}_decode_ratio": f"{rd:.3f}"})
    print(f"\n{provider}")
    print(bc.table(rows, ["graph", "prefill ms", "vs base", "decode ms", "vs base"]))
    return csv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--router-gain", type=float, default=1.0, help="scale the router weights (sparser routing)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--onnx-dir", type=Path, default=None, help="keep (and reuse) the exported graphs here")
    ap.add_argument("--adapters", type=int, default=1, help=">= 2: the multi-adapter rows (see above)")
    ap.add_argument("--batch", type=int, default=8, help="rows of the multi-adapter batch")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="multi-adapter rows: wall-clock or process CPU time (steadier on a shared machine)")
    args = ap.parse_args()
    if args.adapters > 1:
        return multi(args)
    import onnxruntime as ort

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    base = llama(args.hidden, args.layers)
    model = adapted(base, args.experts, args.rank, args.router_gain)
    active = active_experts(model, args.seq)
    print(f"AdaMoLE E={args.experts} r={args.rank}: {active:.2f} experts active per token and site")
    import os

    row = {"device": bc.device_name("cpu"), "load1": f"{os.getloadavg()[0]:.2f}", "threads": args.threads,
           "hidden": args.hidden, "layers": args.layers, "seq": args.seq, "experts": args.experts,
           "rank": args.rank, "router_gain": args.router_gain, "active_experts": f"{active:.2f}"}
    with tempfile.TemporaryDirectory() as tmp:
        out = args.onnx_dir or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        paths = export_all(base, model, out, reuse=args.onnx_dir is not None)
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers() and Path("/dev/nvidiactl").exists():
            providers.append("CUDAExecutionProvider")
        for provider in providers:
            row.update(report(measure(paths, model, args, provider), provider))
    print(f"\nappended to {bc.append_row('onnx_latency', row)}")


def multi(args) -> None:
    """The multi-adapter rows (`_multi.py`)."""
    import os

    import _multi

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, names = _multi.named(llama(args.hidden, args.layers), args.adapters, args.experts, args.rank)
    row = {"device": bc.device_name("cpu"), "load1": f"{os.getloadavg()[0]:.2f}", "threads": args.threads,
           "hidden": args.hidden, "layers": args.layers, "seq": args.seq, "experts": args.experts,
           "rank": args.rank, "adapters": args.adapters, "batch": args.batch, "clock": args.clock}
    with tempfile.TemporaryDirectory() as tmp:
        out = args.onnx_dir or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        times = _multi.measure(model, names, out, args,
                               lambda p: ort_session(p, "CPUExecutionProvider", args.threads))
        row.update(_multi.report(times, args.adapters))
    print(f"\nappended to {bc.append_row('onnx_latency', row)}")


if __name__ == "__main__":
    main()
