"""Multi-adapter rows of `onnx_latency.py --adapters N`: a batch of rows spread over N named adapters, against the
same batch on one adapter, side by side in one run.

    ort single     the single-adapter KV-cache graph (`export_onnx(model, kv_cache=True)`, the active adapter)
    ort stacked    the N-adapter graph (`export_onnx(..., adapters=names)`), `adapter_ids` spreading the rows
    torch single   PyTorch eager, the whole batch on the active adapter
    torch mixed    PyTorch eager inside `batch_adapters(model, rows)` (one block around all its calls, as one
                   block wraps a whole `generate`: the stacked weights are built once)

Prefill: the batch's prompts (empty past). Decode: one token per row after them. Targets: ort stacked <= 1.15x
ort single; torch mixed <= 1.2x torch single.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from _decode import ort_calls, phases, torch_calls

import amole_compile as ac

import _common as bc


def named(base: torch.nn.Module, n: int, experts: int, rank: int) -> tuple[torch.nn.Module, list[str]]:
    """`base` with n AdaMoLE adapters (nonzero B, each its own weights); the first is active."""
    model = copy.deepcopy(base)
    names = [f"adapter{i}" for i in range(n)]
    for name in names:
        ac.transform(model, ac.AdaMoLEConfig(num_experts=experts, rank=rank), adapter_name=name)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("lora_B"):
                p.normal_(0, 0.02)
    ac.set_active_adapter(model, names[0])
    return model.eval(), names


def measure(model, names: list[str], out: Path, args, session) -> dict[str, dict[str, float]]:
    """Median seconds per prefill / decode call of the four rows (ORT round-robin, then PyTorch apart)."""
    batch = args.batch
    rows = [names[i % len(names)] for i in range(batch)]
    single = ac.export_onnx(model, out / "single.onnx", kv_cache=True)
    stacked = ac.export_onnx(model, out / "stacked.onnx", kv_cache=True, adapters=names)
    ids = np.asarray([names.index(r) for r in rows], dtype=np.int64)
    mixed = copy.deepcopy(model)  # its batch_adapters block stays open, as one block wraps a whole generate
    with ac.batch_adapters(mixed, rows):
        groups = [
            {"ort_single": ort_calls(session(single), args.seq, 32000, batch),
             "ort_stacked": ort_calls(session(stacked), args.seq, 32000, batch, {"adapter_ids": ids})},
            {"torch_single": torch_calls(model, args.seq, 32000, batch),
             "torch_mixed": torch_calls(mixed, args.seq, 32000, batch)},
        ]
        return phases(groups, args.steps, args.clock)


def report(times: dict, n: int) -> dict[str, str]:
    """Print the table (ratios against the single-adapter row of the same runtime) -> CSV columns."""
    rows, csv = [], {}
    for name in times["prefill"]:
        ref = "ort_single" if name.startswith("ort") else "torch_single"
        p, d = times["prefill"][name], times["decode"][name]
        rp, rd = p / times["prefill"][ref], d / times["decode"][ref]
        rows.append([name, f"{p * 1e3:.2f}", f"{rp:.3f}x", f"{d * 1e3:.3f}", f"{rd:.3f}x"])
        csv.update({f"multi{n}_{name}_prefill_ms": f"{p * 1e3:.3f}", f"multi{n}_{name}_prefill_ratio": f"{rp:.3f}",
                    f"multi{n}_{name}_decode_ms": f"{d * 1e3:.4f}", f"multi{n}_{name}_decode_ratio": f"{rd:.3f}"})
    print(f"\n{n} adapters, rows spread over them, against the same batch on one adapter")
    print(bc.table(rows, ["graph", "prefill ms", "vs single", "decode ms", "vs single"]))
    return csv
