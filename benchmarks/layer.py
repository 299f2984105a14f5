"""One projection's forward + backward, side by side: the frozen linear alone, linear + LoRA(r = E * rank),
linear + AdaMoLE (E experts of rank r; Triton kernels on CUDA, the torch path elsewhere) and linear + the
reference's loop over experts (gather / scatter per expert, tests/upstream_loop.py), per size.

    python benchmarks/layer.py [--device cuda] [--dtype bfloat16] [--sizes 1024x2048,4096x8192]
                               [--clock process --threads 1]   # CPU time of this process, one thread: on a shared
                                                               # CPU, wall time also counts the other tenants

Sizes are DxT (d_in = d_out = D, T tokens). Prints ms and ratios, appends one CSV row per size.
Target (roofline in benchmarks/README.md): AdaMoLE <= 1.05x linear + LoRA at D = 4096 in bf16 on a GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from amole_compile import AdaMoLEConfig
from amole_compile.model.projection import AdaMoLELinear

import _common as bc
from upstream_loop import LoopLinear


class LoraLinear(nn.Module):
    """PEFT's LoRA layer in plain torch: base(x) + B(A(dropout(x))) * scale."""

    def __init__(self, base: nn.Linear, rank: int, dropout: float) -> None:
        super().__init__()
        self.base_layer, self.drop = base, nn.Dropout(dropout)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device,
                                dtype=base.weight.dtype)
        nn.init.normal_(self.lora_B.weight, std=0.01)
        self.scale = 16.0 / rank

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(self.drop(x))) * self.scale


def contenders(d: int, experts: int, rank: int, dropout: float, device: str, dtype: torch.dtype) -> dict:
    base = nn.Linear(d, d, bias=False, device=device, dtype=dtype).requires_grad_(False)
    amole = AdaMoLELinear(base, ("q",), (tuple(range(d)),), AdaMoLEConfig(num_experts=experts, rank=rank,
                                                                       dropout=dropout))
    nn.init.normal_(amole.group["q"].lora_B, std=0.01)
    loop = LoopLinear(base, experts, rank, 16.0, dropout)
    for expert in loop.moe.experts:
        nn.init.normal_(expert.lora_B.weight, std=0.01)
    return {"frozen linear": base, "linear + lora": LoraLinear(base, experts * rank, dropout), "linear + amole": amole,
            "linear + loop": loop}


def fwd_bwd(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def run():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(grad)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--sizes", default=None,
                    help="DxT list; default 1024x2048,2048x4096,4096x8192 on CUDA, 512x1024,1024x2048 on CPU")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="wall time, or this process's CPU time (CPU only; robust to other tenants)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--skip", default="", help="comma-separated contenders to leave out (e.g. 'linear + loop')")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    sizes = args.sizes or ("1024x2048,2048x4096,4096x8192" if cuda else "512x1024,1024x2048")
    dev = bc.device_name(args.device)
    rows = []
    for size in sizes.split(","):
        d, t = (int(v) for v in size.lower().split("x"))
        torch.manual_seed(0)
        x = torch.randn(t, d, device=args.device, dtype=dtype, requires_grad=True)
        grad = torch.randn(t, d, device=args.device, dtype=dtype)
        layers = contenders(d, args.experts, args.rank, args.dropout, args.device, dtype)
        for name in filter(None, (n.strip() for n in args.skip.split(","))):
            layers.pop(name)
        for layer in layers.values():
            layer.train()
        times = bc.interleaved({k: fwd_bwd(v, x, grad) for k, v in layers.items()}, args.steps, args.warmup,
                               args.device, args.clock)
        base, lora, amole = times["frozen linear"], times["linear + lora"], times["linear + amole"]
        loop = times.get("linear + loop", float("nan"))
        rows.append([size, f"{base * 1e3:.2f}", f"{lora * 1e3:.2f}", f"{amole * 1e3:.2f}", f"{loop * 1e3:.2f}",
                     f"{amole / base:.3f}", f"{amole / lora:.3f}", f"{loop / amole:.2f}"])
        bc.append_row("layer", {"device": dev, "dtype": str(dtype).split(".")[-1], "D": d, "T": t,
                                "experts": args.experts, "rank": args.rank, "frozen ms": round(base * 1e3, 3),
                                "lora ms": round(lora * 1e3, 3), "amole ms": round(amole * 1e3, 3),
                                "loop ms": round(loop * 1e3, 3), "clock": args.clock,
                                "threads": torch.get_num_threads()})
    clock = ", process CPU time" if args.clock == "process" else ""
    print(f"one projection fwd+bwd, E={args.experts} r={args.rank} dropout={args.dropout}, {dtype}, {dev}{clock}, "
          f"{torch.get_num_threads()} threads")
    print(bc.table(rows, ["DxT", "frozen ms", "+lora ms", "+amole ms", "+loop ms", "amole/frozen", "amole/lora",
                          "loop/amole"]))


if __name__ == "__main__":
    main()
