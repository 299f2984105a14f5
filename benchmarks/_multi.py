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


def _ort_calls(sess, batch: int, seq: int, vocab: int, rows: np.ndarray | None) -> tuple:
    ids = np.random.default_rng(0).integers(1, vocab, (batch, seq + 1)).astype(np.int64)
    inputs = {i.name: i for i in sess.get_inputs()}
    past_names = [n for n in inputs if n.startswith("past_key_values.")]
    empty = {n: np.zeros((batch, inputs[n].shape[1], 0, inputs[n].shape[3]), np.float32) for n in past_names}
    pos = np.broadcast_to(np.arange(seq + 1, dtype=np.int64), (batch, seq + 1))
    extra = {} if rows is None else {"adapter_ids": rows}
    first = {"input_ids": ids[:, :seq], "attention_mask": np.ones((batch, seq), np.int64),
             "position_ids": pos[:, :seq], **extra}
    out = sess.run(None, {**first, **empty})
    step = {"input_ids": ids[:, seq:], "attention_mask": np.ones((batch, seq + 1), np.int64),
            "position_ids": pos[:, seq:], **extra, **dict(zip(past_names, out[1:], strict=True))}
    return (lambda: sess.run(["logits"], {**first, **empty})), (lambda: sess.run(["logits"], step))


def _torch_calls(model, batch: int, seq: int, vocab: int) -> tuple:
    """(prefill, decode) closures of `model` as it is (inside a `batch_adapters` block or not)."""
    from transformers.cache_utils import DynamicCache

    ids = torch.randint(1, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(input_ids=ids[:, :seq], use_cache=True).past_key_values
    kv = [(layer.keys, layer.values) for layer in cache.layers]

    @torch.no_grad()
    def prefill():
        model(input_ids=ids[:, :seq], use_cache=True)

    @torch.no_grad()
    def decode():
        model(input_ids=ids[:, seq:], past_key_values=DynamicCache(kv), use_cache=True)

    return prefill, decode


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
            {"ort_single": _ort_calls(session(single), batch, args.seq, 32000, None),
             "ort_stacked": _ort_calls(session(stacked), batch, args.seq, 32000, ids)},
            {"torch_single": _torch_calls(model, batch, args.seq, 32000),
             "torch_mixed": _torch_calls(mixed, batch, args.seq, 32000)},
        ]
        result = {"prefill": {}, "decode": {}}
        for calls in groups:
            for phase, idx, steps in (("prefill", 0, args.steps), ("decode", 1, args.steps * 5)):
                result[phase].update(bc.interleaved({k: v[idx] for k, v in calls.items()}, steps, 3, "cpu",
                                                    args.clock))
    return result


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
