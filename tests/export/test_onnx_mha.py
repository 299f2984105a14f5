"""ONNX export of a hand-written model (no HF config) around an adapted nn.MultiheadAttention, batch-first or
seq-first: the graph equals PyTorch, with one adapter and with each row's own (`adapter_ids`), where the
seq-first feed-forward holds the rows in dimension 1 (`passes/find_rows.py`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import amole_compile as ac
from amole_compile.model.state import projections

from mixed_models import randomize

V, D = 50, 32
CFG = ac.AdaMoLEConfig(num_experts=4, rank=2, roles="all", dropout=0.0)


class MHALM(nn.Module):
    """input_ids [B, S] (and a padding mask) -> {"logits": [B, S, V]}; the attention and the feed-forward run
    batch-first, or seq-first ([S, B, D]) with `batch_first=False`."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(V, D)
        self.attn = nn.MultiheadAttention(D, 4, batch_first=batch_first)
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.head = nn.Linear(D, V)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        s = h.shape[1]
        causal = torch.triu(torch.ones(s, s, dtype=torch.bool, device=h.device), 1)
        pad = None if attention_mask is None else attention_mask == 0
        h = h if self.batch_first else h.transpose(0, 1)
        h = h + self.attn(h, h, h, attn_mask=causal, key_padding_mask=pad, need_weights=False)[0]
        h = h + self.down(F.relu(self.up(h)))
        h = h if self.batch_first else h.transpose(0, 1)
        return {"logits": self.head(h)}


def _adapted(batch_first: bool, names=("a",)):
    torch.manual_seed(0)
    model = MHALM(batch_first).eval()
    for i, name in enumerate(names):
        ac.transform(model, CFG, adapter_name=name, example_inputs=(torch.randint(0, V, (2, 8)),))
        randomize(model, name, seed=i)
    return model


def _inputs():
    x = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # left padding
    return x, mask


def _close(got, want, mask):
    keep = mask.bool()
    got = torch.as_tensor(got)[keep]
    assert (got - want[keep]).abs().max() <= 1e-5 * want[keep].abs().max()


@pytest.mark.parametrize("batch_first", [True, False])
def test_adapted_multihead_attention_exports_equal_to_pytorch(batch_first, tmp_path):
    model = _adapted(batch_first)
    assert len(projections(model)) == 4  # in_proj (q, k, v), out_proj, up, down
    x, mask = _inputs()
    with torch.no_grad():
        want = model(x, attention_mask=mask)["logits"]
    lm = ac.OnnxLM(ac.export_onnx(model, tmp_path / "mha.onnx"))
    _close(lm.logits(x, mask), want, mask)


@pytest.mark.slow
def test_seq_first_rows_run_their_adapters_in_onnx(tmp_path):
    model = _adapted(False, names=("a", "b"))
    assert {n: h.batch_dim.dim for n, h in projections(model)}["up"] == 1
    x, mask = _inputs()
    rows = ["b", None, "a"]
    want = torch.empty(*x.shape, V)
    with torch.no_grad():
        for name in set(rows):
            ac.set_active_adapter(model, name)
            out = model(x, attention_mask=mask)["logits"]
            for i, r in enumerate(rows):
                if r == name:
                    want[i] = out[i]
    lm = ac.OnnxLM(ac.export_onnx(model, tmp_path / "rows.onnx", adapters=["a", "b"]))
    _close(lm.logits(x, mask, adapter_ids=rows), want, mask)
