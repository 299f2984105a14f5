"""nn.MultiheadAttention adapted (issue 22, item 6): its forward rewritten with the projections computed as
adapted projections. Equal to torch's at initialisation for every supported option, trained (adapter gradients,
outputs move) inside TransformerEncoderLayer / TransformerDecoderLayer models, compiled in one graph, saved and
loaded, untransformed back to the original module; unsupported options refused by name.

Legend: N batch, L target length, S source length, E embed_dim, H heads.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import amole_compile as ac
from amole_compile.integrations.patches import MhaFastpath
from amole_compile.model.attention import AdaMoLEMultiheadAttention
from amole_compile.model.modules import ExpertSet
from amole_compile.model.state import adapter_state

N, L, S, E, H = 3, 5, 7, 16, 2
CFG = ac.AdaMoLEConfig(num_experts=2, rank=2, dropout=0.0)


class Attend(nn.Module):
    """An nn.MultiheadAttention called with (query, key, value) as given, and options per call."""

    def __init__(self, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, **kw)
        self.call: dict = {}

    def forward(self, q, k, v):
        out, weights = self.attn(q, k, v, **self.call)
        return out if weights is None else (out, weights)


def _inputs(batch_first, kind, kdim=E, vdim=E, batched=True):
    g = torch.Generator().manual_seed(0)

    def t(n, d):
        x = torch.randn(N, n, d, generator=g)
        x = x if batch_first else x.transpose(0, 1)
        return x if batched else x[0] if batch_first else x[:, 0]

    q = t(L, E)
    if kind == "self":
        return q, q, q
    k = t(S, kdim)
    return (q, k, k) if kind == "cross" and kdim == vdim else (q, k, t(S, vdim))


def _masks(kind_mask, tgt, src, causal):
    if causal:
        return {"attn_mask": nn.Transformer.generate_square_subsequent_mask(tgt), "is_causal": True}
    if kind_mask == "float":
        return {"attn_mask": torch.randn(tgt, src, generator=torch.Generator().manual_seed(1))}
    if kind_mask == "bool":
        mask = torch.zeros(tgt, src, dtype=torch.bool)
        mask[:, -1] = True
        return {"attn_mask": mask}
    if kind_mask == "padding":
        pad = torch.zeros(N, src, dtype=torch.bool)
        pad[:, -2:] = True
        return {"key_padding_mask": pad}
    return {}


CASES = [c for c in itertools.product([True, False], ["self", "cross", "three"], [False, True], [True, False],
                                      [None, "float", "bool", "padding", "causal"])
         if not (c[2] and c[1] == "self") and not (c[4] == "causal" and c[1] != "self")]


def _equal(a, b):
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch_first,kind,separate,need_weights,mask", CASES)
def test_equal_to_torch_at_initialisation(batch_first, kind, separate, need_weights, mask):
    """B = 0: the adapted attention computes what nn.MultiheadAttention computes, output and weights."""
    kw = dict(kdim=8, vdim=12) if separate else {}
    model = Attend(batch_first=batch_first, **kw).eval()
    inputs = _inputs(batch_first, kind, **kw)
    src = S if kind != "self" else L
    model.call = {"need_weights": need_weights, **_masks(mask, L, src, mask == "causal")}
    ref = model(*inputs)
    ac.transform(model, CFG, example_inputs=inputs)
    assert type(model.attn) is AdaMoLEMultiheadAttention
    names = ["attn.in_proj_weight"] if not separate else ["attn.q_proj_weight", "attn.k_proj_weight",
                                                         "attn.v_proj_weight"]
    assert [t.module for t in ac.targets(model)] == names + ["attn.out_proj"]
    _equal(model(*inputs), ref)


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_unbatched_and_average_weights(kind):
    model = Attend().eval()
    inputs = _inputs(False, kind, batched=False)
    model.call = {"average_attn_weights": False}
    ref = model(*inputs)
    ac.transform(model, CFG, example_inputs=inputs)
    _equal(model(*inputs), ref)


def test_attention_dropout_in_training_draws_as_torch():
    model = Attend(batch_first=True, dropout=0.3).train()
    base, inputs = copy.deepcopy(model), _inputs(True, "cross")
    ac.transform(model, CFG, example_inputs=inputs)
    model.train()
    torch.manual_seed(5)
    ref = base(*inputs)
    torch.manual_seed(5)
    _equal(model(*inputs), ref)


@pytest.mark.parametrize("option,kw", [("add_bias_kv", {"add_bias_kv": True}),
                                       ("add_zero_attn", {"add_zero_attn": True})])
def test_unsupported_options_are_refused_by_name(option, kw):
    model = Attend(batch_first=True, **kw).eval()
    inputs = _inputs(True, "self")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ac.UnsupportedLayerError, match=rf"cannot adapt attn: nn.MultiheadAttention\({option}=True\)"):
        ac.transform(model, CFG, example_inputs=inputs)
    assert type(model.attn) is nn.MultiheadAttention and not ac.is_transformed(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
                                    for _ in range(2))

    def forward(self, x, pad=None):
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=pad)
        return x


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(E, H, 32, dropout=0.0)

    def forward(self, x, memory):  # x [L, N, E], memory [S, N, E]
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[0])
        return self.layer(x, memory, tgt_mask=causal, tgt_is_causal=True)


def _model(cls):
    torch.manual_seed(0)
    return cls().eval()


def _example(cls):
    g = torch.Generator().manual_seed(2)
    if cls is Encoder:
        return (torch.randn(N, L, E, generator=g),)
    return torch.randn(L, N, E, generator=g), torch.randn(S, N, E, generator=g)


TARGETS = {Encoder: [f"layers.{i}.self_attn.{p}" for i in range(2) for p in ("in_proj_weight", "out_proj")],
           Decoder: [f"layer.{a}.{p}" for a in ("self_attn", "multihead_attn") for p in ("in_proj_weight", "out_proj")]}


@pytest.mark.parametrize("cls", [Encoder, Decoder])
def test_transformer_layers_adapt_and_train(cls):
    model, inputs = _model(cls), _example(cls)
    ref = model(*inputs)
    ac.transform(model, CFG, example_inputs=inputs)
    assert [(t.module, t.roles) for t in ac.targets(model)] == [
        (m, ("q", "k", "v") if m.endswith("in_proj_weight") else ("o",)) for m in TARGETS[cls]]
    with torch.no_grad():  # inference (torch's fast path would read the weights itself)
        _equal(model(*inputs), ref)
    model.train()
    (model(*inputs).pow(2).mean() + ac.aux_loss(model)).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n.endswith("lora_B")}
    assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    model.eval()
    with torch.no_grad():
        moved = model(*inputs)
    assert (moved - ref).abs().max() > 1e-4
    torch.testing.assert_close(model(*inputs), moved, rtol=0, atol=0)  # eval with and without gradients alike


def _randomised(model):
    with torch.no_grad():
        for n, p in adapter_state(model).items():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    return model


@pytest.fixture
def fast_path_on(monkeypatch):
    """The fast-path flag's registry as if no model held it, the fast path on; restored after."""
    monkeypatch.setattr(MhaFastpath, "_live", {})
    monkeypatch.setattr(MhaFastpath, "_saved", None)
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(True)
    yield
    torch.backends.mha.set_fastpath_enabled(before)


def test_the_encoder_fast_path_is_off_while_adapted(fast_path_on):
    """TransformerEncoder / EncoderLayer inference with a padding mask would take torch's fused path, which
    reads in_proj_weight itself; while a model holds an adapted attention the fast path is off, and back after."""
    model, inputs = _model(Encoder), _example(Encoder)
    pad = torch.zeros(N, L, dtype=torch.bool)
    pad[:, -1] = True
    ac.transform(model, CFG, example_inputs=inputs)
    _randomised(model)
    assert not torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad():
        fast = model(inputs[0], pad)
    slow = model(inputs[0], pad)  # gradients on: never the fast path
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-6)
    ac.untransform(model)
    assert all(type(layer.self_attn) is nn.MultiheadAttention for layer in model.layers)
    assert torch.backends.mha.get_fastpath_enabled()


@pytest.mark.slow
@pytest.mark.parametrize("cls", [Encoder, Decoder])
def test_compiles_in_one_graph(cls):
    torch._dynamo.reset()
    model, inputs = _model(cls), _example(cls)
    ac.transform(model, CFG, example_inputs=inputs)
    _randomised(model).train()
    eager = model(*inputs).pow(2).mean() + ac.aux_loss(model)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(lambda *a: model(*a).pow(2).mean() + ac.aux_loss(model), backend=counter, fullgraph=True)
    loss = step(*inputs)
    loss.backward()
    assert counter.frame_count == 1
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    assert all(s.lora_B.grad is not None for s in model.modules() if isinstance(s, ExpertSet))
    torch._dynamo.reset()


@pytest.mark.parametrize("cls", [Encoder, Decoder])
def test_save_load_round_trip_and_untransform(cls, tmp_path):
    model, inputs = _model(cls), _example(cls)
    ref = model(*inputs)
    base_keys = set(model.state_dict())
    ac.transform(model, CFG, example_inputs=inputs)
    _randomised(model)
    out = model(*inputs)
    assert set(ac.base_state_dict(model)) == base_keys  # the base under its own names
    assert any(".base_layer.in_proj_weight" in k for k in model.state_dict())
    ac.save_adapters(model, tmp_path)
    fresh = _model(cls)
    ac.load_adapters(fresh, tmp_path, example_inputs=inputs)
    torch.testing.assert_close(fresh(*inputs), out, rtol=0, atol=0)
    ac.untransform(model)
    assert set(model.state_dict()) == base_keys
    torch.testing.assert_close(model(*inputs), ref, rtol=0, atol=0)


def test_a_second_adapter_and_mixed_batches():
    model, inputs = Attend(batch_first=True).eval(), _inputs(True, "cross")
    model.call = {"need_weights": False}
    ac.transform(model, CFG, example_inputs=inputs)
    ac.transform(model, ac.AdaMoLEConfig(method="mole", num_experts=3, rank=2, dropout=0.0, roles=("q", "v")),
                 adapter_name="b", example_inputs=inputs)
    _randomised(model)
    with torch.no_grad():
        ac.set_active_adapter(model, "default")
        a = model(*inputs)
        ac.set_active_adapter(model, "b")
        b = model(*inputs)
        with ac.batch_adapters(model, ["default", "b", None]):
            mixed = model(*inputs)
    torch.testing.assert_close(mixed[0], a[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], b[1], rtol=0, atol=1e-6)
    assert [t.module for t in ac.targets(model, "b")] == ["attn.in_proj_weight"]
    ac.delete_adapter(model, "default")  # "b" keeps the attention adapted, out_proj's holder goes
    assert list(model.attn.adapted) == ["in_proj_weight"]
    ac.delete_adapter(model, "b")
    assert type(model.attn) is nn.MultiheadAttention


def test_the_graph_path_computes_the_module_path():
    """An exported program with cross-attention (q and kv read slices of in_proj_weight): op nodes on each
    slice, equal to the nn.Module path with the same adapter weights."""
    model, inputs = Attend(batch_first=True).eval(), _inputs(True, "cross")
    model.call = {"need_weights": False}
    gm = ac.transform(torch.export.export(model, inputs, strict=False), CFG)
    module = ac.transform(copy.deepcopy(model), CFG, example_inputs=inputs)
    assert ac.targets(gm) == ac.targets(module)
    _randomised(gm)
    ours, theirs = adapter_state(gm), adapter_state(module)
    with torch.no_grad():
        for k, v in ours.items():
            theirs[k].copy_(v)
    torch.testing.assert_close(gm(*inputs), module(*inputs), rtol=0, atol=1e-6)
