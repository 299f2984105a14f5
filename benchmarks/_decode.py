"""Prefill / decode-step closures of a KV-cache decoder (an onnxruntime session or an HF model) and their
side-by-side timing, shared by `onnx_latency.py` and its multi-adapter rows (`_multi.py`)."""

from __future__ import annotations

import numpy as np
import torch

import _common as bc


def ort_calls(sess, seq: int, vocab: int, batch: int = 1, extra: dict | None = None) -> tuple:
    """(prefill, decode) closures on `batch` rows of `seq` tokens; decode feeds the prefill's present as past.
    `extra`: more inputs for both (e.g. adapter_ids)."""
    ids = np.random.default_rng(0).integers(1, vocab, (batch, seq + 1)).astype(np.int64)
    inputs = {i.name: i for i in sess.get_inputs()}
    past_names = [n for n in inputs if n.startswith("past_key_values.")]
    empty = {n: np.zeros((batch, inputs[n].shape[1], 0, inputs[n].shape[3]), np.float32) for n in past_names}
    pos = np.broadcast_to(np.arange(seq + 1, dtype=np.int64), (batch, seq + 1))
    extra = extra or {}
    first = {"input_ids": ids[:, :seq], "attention_mask": np.ones((batch, seq), np.int64),
             "position_ids": pos[:, :seq], **extra}
    out = sess.run(None, {**first, **empty})
    step = {"input_ids": ids[:, seq:], "attention_mask": np.ones((batch, seq + 1), np.int64),
            "position_ids": pos[:, seq:], **extra, **dict(zip(past_names, out[1:], strict=True))}
    return (lambda: sess.run(["logits"], {**first, **empty})), (lambda: sess.run(["logits"], step))


def torch_calls(model, seq: int, vocab: int, batch: int = 1) -> tuple:
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


def phases(groups: list[dict], steps: int, clock: str = "wall") -> dict[str, dict[str, float]]:
    """Median seconds per prefill and per decode call (5x the steps) of each (prefill, decode) pair; each group
    runs round-robin within itself, apart from the other groups."""
    result = {"prefill": {}, "decode": {}}
    for calls in groups:
        for phase, idx, n in (("prefill", 0, steps), ("decode", 1, steps * 5)):
            result[phase].update(bc.interleaved({k: v[idx] for k, v in calls.items()}, n, 3, "cpu", clock))
    return result
