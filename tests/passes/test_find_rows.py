"""find_rows: each projection's batch dimension, found by forwards of one row and two, so that a mixed batch gives
each row its adapter whatever the model's layout (seq-first [S, B, D], flattened [B * S, D]), and raises where
no dimension holds the rows (interleaved [S * B, D], inputs the rows share, no example inputs)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import amole_compile as ac
from amole_compile.model.state import projections
from amole_compile.passes.find_rows import _call_layout, _layout, find_rows

from mixed_models import randomize
from models import build, ids

V, D, H = 50, 32, 4
NAMES = {"q", "k", "v", "o", "up", "down"}
CFG = ac.AdaMoLEConfig(num_experts=4, rank=2, roles="all", dropout=0.0)


class SeqFirst(nn.Module):
    """Hand-written, seq-first inside ([S, B, D], as nn.Transformer's default): token ids [B, S] in, logits
    [B, S, V] out. `ffn`: the feed-forward's input [S, B, D] ("seq"), row-major [B * S, D] ("rows") or
    token-major [S * B, D] ("tokens")."""

    def __init__(self, ffn: str = "seq") -> None:
        super().__init__()
        self.ffn = ffn
        self.emb = nn.Embedding(V, D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.up, self.down = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.head = nn.Linear(D, V)

    def forward(self, tokens):
        h = self.emb(tokens).transpose(0, 1)  # [S, B, D]
        s, b, d = h.shape

        def heads(t):  # [S, B, D] -> [B * H, S, D / H]
            return t.reshape(s, b * H, d // H).transpose(0, 1)

        a = F.scaled_dot_product_attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)), is_causal=True)
        h = h + self.o(a.transpose(0, 1).reshape(s, b, d))
        if self.ffn == "seq":
            h = h + self.down(F.gelu(self.up(h)))
        elif self.ffn == "tokens":
            h = h + self.down(F.gelu(self.up(h.reshape(s * b, d)))).reshape(s, b, d)
        else:
            f = h.transpose(0, 1).reshape(b * s, d)
            h = h + self.down(F.gelu(self.up(f))).reshape(b, s, d).transpose(0, 1)
        return self.head(h).transpose(0, 1)


class MHASeqFirst(nn.Module):
    """nn.MultiheadAttention with its default batch_first=False, then an MLP on [S, B, D] (batch-first
    throughout with `batch_first=True`); `attention_mask` [B, S] marks padding."""

    def __init__(self, batch_first: bool = False) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(V, D)
        self.attn = nn.MultiheadAttention(D, H, batch_first=batch_first)
        self.up, self.down = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.head = nn.Linear(D, V)

    def forward(self, tokens, attention_mask=None):
        pad = None if attention_mask is None else attention_mask == 0
        h = self.emb(tokens)
        h = h if self.batch_first else h.transpose(0, 1)  # [S, B, D]
        h = h + self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        h = h + self.down(F.relu(self.up(h)))
        return self.head(h) if self.batch_first else self.head(h).transpose(0, 1)


def _adapted(model, names=("a", "b")):
    example = (ids(2, 8) % V,)
    torch.manual_seed(0)
    for i, name in enumerate(names):
        ac.transform(model, CFG, adapter_name=name, example_inputs=example)
        randomize(model, name, seed=i, b_scale=0.3)
    return model.eval()


def _alone(model, x, rows):
    """Each row's output with its adapter active alone."""
    out = torch.empty(*x.shape, V)
    with torch.no_grad():
        for name in set(rows):
            ac.set_active_adapter(model, name)
            full = model(x)
            for i, r in enumerate(rows):
                if r == name:
                    out[i] = full[i]
    return out


def _dims(model):
    return {n: h.batch_dim.dim for n, h in projections(model)}


def _check_rows(model, batch, seq):
    x = ids(batch, seq, seed=batch * 10 + seq) % V
    rows = (["a", "b", None] * batch)[:batch]
    want = _alone(model, x, rows)
    with torch.no_grad(), ac.batch_adapters(model, rows):
        got = model(x)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


@pytest.mark.parametrize("batch,seq", [(2, 2), (2, 3), (2, 4), (3, 2), (4, 5)])
def test_seq_first_rows_get_their_adapters(batch, seq):
    # before find_rows, dimension 0 (S) was taken for the batch: rows differed by up to ~1e5 at B = S = 2
    model = _adapted(SeqFirst("seq"))
    assert _dims(model) == dict.fromkeys(NAMES, 1)
    _check_rows(model, batch, seq)


def test_row_major_flattened_input_is_the_batch_dim():
    model = _adapted(SeqFirst("rows"))
    assert _dims(model) == {"q": 1, "k": 1, "v": 1, "o": 1, "up": 0, "down": 0}
    _check_rows(model, 2, 3)
    _check_rows(model, 3, 2)


def test_multihead_attention_seq_first_and_its_mlp():
    model = _adapted(MHASeqFirst())
    dims = _dims(model)
    assert dims["up"] == dims["down"] == 1
    assert [d for n, d in dims.items() if n.startswith("attn.")] == [0, 0]  # run on batch-first views
    _check_rows(model, 2, 2)
    _check_rows(model, 3, 4)


def test_interleaved_rows_raise_naming_the_projection_and_change_nothing():
    model = _adapted(SeqFirst("tokens"))
    found = {n: h.batch_dim for n, h in projections(model)}
    assert [n for n, b in found.items() if b.dim is None] == ["up", "down"]
    assert "interleaved" in found["up"].why
    x = ids(2, 3) % V
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"projection 'up'.*interleaved, token by token"):
        with torch.no_grad(), ac.batch_adapters(model, ["a", "b"]):
            model(x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ac.set_active_adapter(model, "a")
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()  # one adapter for the whole batch needs no batch dimension


def test_hf_model_rows_are_dim_0_and_the_report_counts_them():
    model = build("llama")
    ac.transform(model, ac.AdaMoLEConfig(roles="all"))
    for _, holder in projections(model):
        holder.batch_dim = None
    report = find_rows(model)
    assert report.matched == len(report.found) == len(projections(model)) > 0
    assert set(_dims(model).values()) == {0}
    assert find_rows(model).found == {}  # found once: not probed again


def test_without_example_inputs_a_mixed_batch_raises_until_a_transform_has_them():
    model = SeqFirst("seq")
    plan = ac.plan(model, CFG, example_inputs=(ids(2, 8) % V,))
    with pytest.warns(UserWarning, match="could not check"):
        ac.transform(model, CFG, plan=plan, adapter_name="a")
    assert {h.batch_dim.dim for _, h in projections(model)} == {None}
    with pytest.raises(ValueError, match="no forward of example inputs.*example_inputs="):
        with torch.no_grad(), ac.batch_adapters(model, ["a", None]):
            model(ids(2, 3) % V)
    ac.transform(model, CFG, adapter_name="b", example_inputs=(ids(2, 8) % V,))
    assert _dims(model) == dict.fromkeys(NAMES, 1)


def test_found_dims_survive_deepcopy_and_pickle():
    model = _adapted(SeqFirst("seq"))
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert _dims(twin) == dict.fromkeys(NAMES, 1)
        _check_rows(twin, 2, 2)


def test_an_input_of_other_rank_than_the_examples_raises():
    model = _adapted(SeqFirst("seq"))
    holder = dict(projections(model))["up"]
    x = torch.randn(2, 4, D)
    with torch.no_grad(), ac.batch_adapters(model, ["a", "b"]):
        with pytest.raises(ValueError, match=r"'up': its input has 2 dimensions .* gave it 3"):
            holder.add_to(x[0], torch.zeros(4, 4 * D))


@pytest.mark.parametrize("x1,x2,real,want", [
    ((8, 1, 4), (8, 2, 4), True, 1),  # seq-first
    ((1, 8, 4), (2, 8, 4), False, 0),  # fake tensors: shapes tell a dimension of its own
    ((8, 4), (16, 4), False, "only a forward on real values"),  # flattened: shapes alone cannot tell how
    ((8, 4), (8, 4), True, "does not grow with the batch"),  # shared by the rows
    ((1, 8, 4), (2, 16, 4), True, "no one dimension holds the rows"),
    ((1, 8, 4), (1, 8, 4, 1), True, "for one row and"),
])
def test_call_layout_cases(x1, x2, real, want):
    a = torch.randn(x1)
    b = torch.cat([a, torch.randn(x1)], dim=1) if x1 == (8, 1, 4) else torch.randn(x2)
    got = _call_layout(a, b, real)
    assert got == want if isinstance(want, int) else want in got


def test_a_projection_also_run_on_a_shared_tensor_says_which_calls_hold_rows():
    """DeBERTa's query_proj projects the hidden states [B, S, D] and the relative positions [1, P, D], which every
    row shares: the reason names both kinds of call, not only the shared one."""
    x1, x2 = torch.randn(1, 8, 4), torch.randn(1, 8, 4)
    pos = torch.randn(1, 6, 4)
    got = _layout([x1, pos], [x2, pos], [torch.cat([x1, x2]), pos], True)
    assert got.dim is None
    assert got.why.startswith("of its 2 calls in a forward, some hold the batch in dimension 0 and another does "
                              "not: its input does not grow with the batch")


def test_call_layout_values_tell_row_major_interleaved_alike_and_dependent():
    row0, row1 = torch.randn(8, 4), torch.randn(8, 4)
    assert _call_layout(row0, torch.cat([row0, row1]), True) == 0
    assert "interleaved" in _call_layout(row0, torch.stack([row0, row1], 1).reshape(16, 4), True)
    same = torch.ones(8, 4)
    assert "all alike" in _call_layout(same, torch.ones(16, 4), True)
    assert "not computed independently" in _call_layout(row0, torch.cat([row0 + 1, row1]), True)


def test_seq_first_mixed_batch_compiles_whole_without_recompiles():
    from torch._dynamo.testing import CompileCounterWithBackend

    model = _adapted(SeqFirst("seq"))
    x = ids(3, 4, seed=5) % V
    mixes = [["a", "b", None], ["b", None, "a"], ["a", "a", "a"]]
    wants = [_alone(model, x, rows) for rows in mixes]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for rows, want in zip(mixes, wants, strict=True):
        with ac.batch_adapters(model, rows), torch.no_grad():
            got = compiled(x)
        assert (got - want).abs().max() < 1e-4 * want.abs().max(), rows
    assert counter.frame_count == 1


def test_seq_first_training_rows_reach_their_adapters_only():
    model = _adapted(SeqFirst("seq")).train()
    x = ids(2, 4, seed=6) % V
    with ac.batch_adapters(model, ["b", None]):
        out = model(x)
        out.square().sum().backward()
    adapter = {n: p for n, p in model.named_parameters() if ".adapters." in n}
    assert all(p.grad is None or not p.grad.any() for n, p in adapter.items() if ".adapters.a." in n)
    got = {n: p.grad.clone() for n, p in adapter.items() if ".adapters.b." in n and p.grad is not None}
    assert got and any(g.any() for g in got.values())
    model.zero_grad()
    ac.set_active_adapter(model, "b")
    model(x[:1]).square().sum().backward()  # row 0 alone on adapter b: the same gradients
    for n, g in got.items():
        torch.testing.assert_close(g, adapter[n].grad, rtol=1e-4, atol=1e-5 * adapter[n].grad.abs().max())


def test_an_input_sized_by_the_rows_values_has_no_batch_dim():
    """An MoE's expert gets the tokens routed to it: its input's size depends on the row, and no layout holds."""
    row0, row1 = torch.randn(3, 4), torch.randn(5, 4)
    found = _layout([row0], [row1], [torch.cat([row0, row1])], True)
    assert found.dim is None and "depends on the row's values" in found.why
    assert _layout([row0], [row0 + 1], [torch.cat([row0, row0 + 1])], True).dim == 0
    assert "ran 1 time(s) in a forward of one row and 2" in _layout([row0], [row0], [row0, row0], True).why


def test_seq_first_statistics_skip_padding_as_the_batch_first_twin_does():
    # B = S: read as [B, S], an [S, B] input's padding mask fitted and counted the wrong tokens, silently
    models = []
    for batch_first in (False, True):
        torch.manual_seed(0)
        models.append(_adapted(MHASeqFirst(batch_first), names=("a",)))
    seq_first, twin = models
    assert {n: h.batch_dim.dim for n, h in projections(seq_first)}["up"] == 1
    x = ids(3, 3, seed=8) % V
    mask = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 0, 1]])
    with torch.no_grad():
        for model in models:
            ac.reset_expert_stats(model)
            model(x, attention_mask=mask)
    got, want = (ac.expert_stats(m).to_dict()["sites"] for m in models)
    assert [s["tokens"] for s in got] == [s["tokens"] for s in want] == [int(mask.sum())] * len(want)
    assert got == want


def test_identical_blocks_run_once_and_share_the_layout():
    model = build("llama")
    ac.transform(model, ac.AdaMoLEConfig(roles="all"))
    layers = model.model.layers
    assert len(layers) > 1
    for _, holder in projections(model):
        holder.batch_dim = None
    calls = [0] * len(layers)
    hooks = [layer.self_attn.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(layers)]
    try:
        report = find_rows(model)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [3] + [0] * (len(layers) - 1)  # three forwards; the later layers return layer 0's output
    assert report.matched == len(report.found) == len(projections(model))
    assert set(_dims(model).values()) == {0}
    assert all(isinstance(layer.forward, type(layers[0].forward)) and "forward" not in layer.__dict__
               for layer in layers)  # the wrappers are gone


@pytest.mark.parametrize("ffn,want", [("seq", 1), ("rows", 0)])
def test_one_row_examples_are_enough(ffn, want):
    model = SeqFirst(ffn)
    ac.transform(model, CFG, adapter_name="a", example_inputs=(ids(1, 8) % V,))  # the two-row run: row 0 twice
    assert _dims(model)["up"] == want
