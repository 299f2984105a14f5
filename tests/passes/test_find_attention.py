"""Discovery pass: every attention layer of every tiny architecture gets exactly q, k, v, o; the report's counts;
fused QKV column sets proven by perturbing exactly those weights; a hand-written attention module; filtering;
and a model without attention.
"""

from __future__ import annotations

import contextlib
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import amole_compile as ac

from models import ARCHS, build, ids

LAYERS = 2
# arch -> [(module name template, roles)] for one layer; {i} is the layer index
EXPECTED = {
    **{a: [(f"model.layers.{{i}}.self_attn.{r}_proj", (r,)) for r in "qkvo"] for a in ("llama", "qwen2", "mistral")},
    "gpt2": [("transformer.h.{i}.attn.c_attn", ("q", "k", "v")), ("transformer.h.{i}.attn.c_proj", ("o",))],
    "gpt_neox": [("gpt_neox.layers.{i}.attention.query_key_value", ("q", "k", "v")),
                 ("gpt_neox.layers.{i}.attention.dense", ("o",))],
    "phi3": [("model.layers.{i}.self_attn.qkv_proj", ("q", "k", "v")), ("model.layers.{i}.self_attn.o_proj", ("o",))],
    "opt": [(f"model.decoder.layers.{{i}}.self_attn.{n}", (r,))
            for n, r in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "o"))],
    "bert": [(f"bert.encoder.layer.{{i}}.attention.{n}", (r,)) for n, r in
             (("self.query", "q"), ("self.key", "k"), ("self.value", "v"), ("output.dense", "o"))],
}
HD = 16  # head dim of the tiny models (64 / 4)
# The role columns of fused projections (d = 64, 4 heads; phi3 has 2 kv heads)
FUSED_COLUMNS = {
    "gpt2": {"q": tuple(range(0, 64)), "k": tuple(range(64, 128)), "v": tuple(range(128, 192))},
    "phi3": {"q": tuple(range(0, 64)), "k": tuple(range(64, 96)), "v": tuple(range(96, 128))},
    # GPT-NeoX: view(b, s, heads, 3 * hd).chunk(3, -1): head h owns [48h, 48h + 48), q | k | v inside it
    "gpt_neox": {r: tuple(c for c in range(192) if (c % (3 * HD)) // HD == i) for i, r in enumerate("qkv")},
}


def _layer_of(module: str) -> int:
    return int(re.search(r"\.(\d+)\.", module).group(1))


def check_plan(model, arch, found, report):
    want = [(tpl.format(i=i), roles) for i in range(LAYERS) for tpl, roles in EXPECTED[arch]]
    assert [(t.module, t.roles) for t in found] == want
    assert report.anchors == LAYERS
    assert report.matched == 4 * LAYERS
    assert len(report.targets) == len(want)
    assert report.skipped == []
    for i in range(LAYERS):  # every attention layer: exactly q, k, v, o once each
        roles = sorted(r for t in found if _layer_of(t.module) == i for r in t.roles)
        assert roles == ["k", "o", "q", "v"]
    for t in found:
        layer = model.get_submodule(t.module)
        w = layer.weight
        d_in, d_out = (w.shape[0], w.shape[1]) if type(layer).__name__ == "Conv1D" else (w.shape[1], w.shape[0])
        assert (t.in_features, t.out_features) == (d_in, d_out)
        cols = [c for r in t.roles for c in t.columns(r)]
        assert sorted(cols) == list(range(d_out)) and len(set(cols)) == len(cols)  # disjoint, cover all
        if len(t.roles) == 1:
            assert t.slices == (slice(0, d_out),)
        else:
            assert {r: t.columns(r) for r in t.roles} == FUSED_COLUMNS[arch]
    if arch == "gpt_neox":
        assert all(isinstance(s, tuple) for s in found[0].slices)  # strided, not slices


@pytest.mark.parametrize("arch", ARCHS)
def test_every_attention_layer_gets_qkvo(arch):
    model = build(arch)
    plan = ac.plan(model, ac.AdaMoLEConfig())
    found, report = plan.targets, plan.report
    check_plan(model, arch, found, report)


@pytest.mark.parametrize("arch", ARCHS)
def test_eager_attention(arch):
    model = build(arch, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    plan = ac.plan(model, ac.AdaMoLEConfig())
    found, report = plan.targets, plan.report
    check_plan(model, arch, found, report)


def test_plan_does_not_change_the_model():
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ac.plan(model, ac.AdaMoLEConfig())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training and all(type(m) is not ac.model.projection.AdaMoLELinear for m in model.modules())


# ---- fused slices: perturb exactly one role's weights and watch q, k, v --------------------------------

@contextlib.contextmanager
def recording_sdpa():
    """Record (q, k, v) of every call to F.scaled_dot_product_attention (transformers calls it by attribute)."""
    calls, real = [], F.scaled_dot_product_attention

    def rec(q, k, v, *args, **kwargs):
        calls.append((q.detach().clone(), k.detach().clone(), v.detach().clone()))
        return real(q, k, v, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", rec)
        yield calls


def first_qkv(model, *args, **kwargs):
    with recording_sdpa() as calls, torch.no_grad():
        model(*args, **kwargs)
    assert len(calls) == LAYERS
    return calls[0]  # layer 0


def perturb(layer: nn.Module, cols: tuple[int, ...]) -> None:
    """Add noise to the weight (and bias) entries producing output columns `cols` of a Linear or Conv1D."""
    idx = torch.tensor(cols)
    with torch.no_grad():
        w = layer.weight
        if type(layer).__name__ == "Conv1D":  # y = x W + b, W [D, O]
            w[:, idx] += torch.randn(w.shape[0], len(cols))
        else:  # nn.Linear: W [O, D]
            w[idx, :] += torch.randn(len(cols), w.shape[1])
        if layer.bias is not None:
            layer.bias[idx] += torch.randn(len(cols))


def check_role_columns(model, target, call):
    """For each role of `target`: perturbing its columns changes every element of that role's attention input
    and leaves the other two bit-identical."""
    base = call(model)
    for i, role in enumerate("qkv"):
        m2 = copy.deepcopy(model)
        perturb(m2.get_submodule(target.module), target.columns(role))
        got = call(m2)
        for j, name in enumerate("qkv"):
            if j == i:
                assert bool((got[j] != base[j]).all()), f"perturbing {role} left some of {name} unchanged"
            else:
                assert torch.equal(got[j], base[j]), f"perturbing {role}'s columns changed {name}"


@pytest.mark.parametrize("arch", sorted(FUSED_COLUMNS))
def test_fused_slices_feed_exactly_their_role(arch):
    model = build(arch)
    found = ac.plan(model, ac.AdaMoLEConfig()).targets
    fused = found[0]
    assert fused.roles == ("q", "k", "v")
    x = ids(2, 8, seed=3)
    check_role_columns(model, fused, lambda m: first_qkv(m, input_ids=x))


class HandAttention(nn.Module):
    """Self-attention written by hand: one fused qkv Linear, split, SDPA, output Linear."""

    def __init__(self, d: int = 24, heads: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):  # x [B, S, D]
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))  # [B, H, S, hd]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(o.transpose(1, 2).reshape(b, s, d))


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = HandAttention()
        self.mlp = nn.Linear(24, 24)
        self.b = HandAttention()

    def forward(self, x):
        return self.b(torch.relu(self.mlp(self.a(x))))


def test_hand_written_attention_module():
    model = TwoBlocks().eval()
    x = torch.randn(2, 5, 24)
    ref = model(x)
    plan = ac.plan(model, ac.AdaMoLEConfig(), example_inputs=(x,))
    found, report = plan.targets, plan.report
    assert report.anchors == 2 and report.matched == 8
    assert [(t.module, t.roles, t.slices) for t in found] == [
        ("a.qkv", ("q", "k", "v"), (slice(0, 24), slice(24, 48), slice(48, 72))), ("a.proj", ("o",), (slice(0, 24),)),
        ("b.qkv", ("q", "k", "v"), (slice(0, 24), slice(24, 48), slice(48, 72))), ("b.proj", ("o",), (slice(0, 24),))]
    check_role_columns(model, found[0], lambda m: first_qkv(m, x))
    assert ac.transform(model, ac.AdaMoLEConfig(), example_inputs=(x,)) is model
    assert ac.targets(model) == found
    assert type(model.mlp) is nn.Linear  # the MLP between blocks is not an attention projection
    assert torch.equal(model(x), ref)
    with torch.no_grad():
        model.a.qkv.group["k"].lora_B.normal_()
    assert not torch.allclose(model(x), ref)


class KeysFirst(nn.Module):
    """Cross-attention with the score product written `k @ qᵀ` (softmax over the key axis, -2), and an output
    that passes through parameter ops that are not projections (a scale, a layer norm's weight, `@ diag(s)`)
    before o_proj: q, k and o are told by dataflow, not by argument order or position."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.gamma, self.ln_w, self.s = nn.Parameter(torch.rand(d)), nn.Parameter(torch.rand(d)), \
            nn.Parameter(torch.rand(d))

    def forward(self, x, memory):  # x [B, Sq, D], memory [B, Sk, D], Sk != Sq
        q, k, v = self.q_proj(x), self.k_proj(memory), self.v_proj(memory)
        p = torch.matmul(k, q.transpose(-1, -2)).softmax(dim=-2)  # [B, Sk, Sq], normalised over keys
        out = p.transpose(-1, -2) @ v  # [B, Sq, D]
        return self.o_proj(F.layer_norm(out * self.gamma, (out.shape[-1],), self.ln_w) @ torch.diag(self.s))


def test_roles_by_dataflow_not_argument_order():
    model = KeysFirst()
    inputs = (torch.randn(2, 3, 16), torch.randn(2, 7, 16))
    plan = ac.plan(model, example_inputs=inputs)
    assert [(t.module, t.roles) for t in plan.targets] == [
        ("q_proj", ("q",)), ("k_proj", ("k",)), ("v_proj", ("v",)), ("o_proj", ("o",))], plan.describe()
    ref = model(*inputs)
    ac.transform(model, ac.AdaMoLEConfig(num_experts=2, rank=2, dropout=0.0), example_inputs=inputs)
    assert torch.equal(model(*inputs), ref)


# ---- filtering ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    return build("llama")


@pytest.mark.parametrize("kwargs,want", [
    ({"roles": ("q", "v")}, [f"model.layers.{i}.self_attn.{r}_proj" for i in (0, 1) for r in "qv"]),
    ({"include": r"layers\.1\."}, [f"model.layers.1.self_attn.{r}_proj" for r in "qkvo"]),
    ({"exclude": "o_proj|k_proj"}, [f"model.layers.{i}.self_attn.{r}_proj" for i in (0, 1) for r in "qv"]),
    ({"include": r"\.0\.", "exclude": "q_proj", "roles": ("q", "k", "o")},
     [f"model.layers.0.self_attn.{r}_proj" for r in "ko"]),
])
def test_filtering(llama, kwargs, want):
    plan = ac.plan(llama, ac.AdaMoLEConfig(**kwargs))
    found, report = plan.targets, plan.report
    assert [t.module for t in found] == want
    assert report.anchors == 2 and report.matched == 8  # the report counts what was found before filtering
    n_regex_skipped = 8 - len(want) if "roles" not in kwargs else None
    if n_regex_skipped is not None:
        assert len(report.skipped) == n_regex_skipped
        assert all(s.reason in ("include", "exclude") for s in report.skipped)
        assert all(s.reason in str(s) for s in report.skipped)  # "<module>: does not match include=..."


def test_filtering_roles_of_a_fused_projection():
    model = build("gpt2")
    found = ac.plan(model, ac.AdaMoLEConfig(roles=("q", "v"))).targets
    assert [(t.module, t.roles, t.slices) for t in found] == [
        (f"transformer.h.{i}.attn.c_attn", ("q", "v"), (slice(0, 64), slice(128, 192))) for i in (0, 1)]
    ac.transform(model, ac.AdaMoLEConfig(roles=("k",), include=r"h\.1\."))
    assert [(t.module, t.roles, t.slices) for t in ac.targets(model)] == [
        ("transformer.h.1.attn.c_attn", ("k",), (slice(64, 128),))]


def test_everything_filtered_out(llama):
    with pytest.raises(ac.NoAttentionFound, match="LlamaForCausalLM.*filtered out"):
        ac.plan(llama, ac.AdaMoLEConfig(include="no_such_module"))


class JustMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.softmax(self.fc1(x), -1))


def test_no_attention_found():
    model = JustMLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ac.NoAttentionFound) as info:
        ac.transform(model, ac.AdaMoLEConfig(), example_inputs=(torch.randn(2, 8),))
    msg = str(info.value)
    assert "JustMLP" in msg and "scaled_dot_product_attention" in msg and "softmax" in msg
    assert isinstance(info.value, ValueError)
    assert type(model.fc1) is nn.Linear and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_banded_sliding_window_attention():
    """LED's encoder (Longformer's attention): scores are computed in overlapping chunks and laid out as a band,
    probabilities [B, S, H, 2w + 1], so no score product had the probabilities' last two sizes and the encoder got
    no adapters, with no note. When no product behind the softmax matches those sizes, all of them are taken;
    the encoder's query, key, value and output are found, the global-attention projections (unused without a
    global mask) are not."""
    import transformers as tf

    cfg = tf.AutoConfig.for_model("led", vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                  decoder_ffn_dim=128, max_encoder_position_embeddings=64,
                                  max_decoder_position_embeddings=64, attention_window=[4, 4], pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
    torch.manual_seed(0)
    model = tf.AutoModelForSeq2SeqLM.from_config(cfg).eval()
    x = ids(3, 8)
    inputs = dict(input_ids=x, decoder_input_ids=x[:, :5])
    plan = ac.plan(model, ac.AdaMoLEConfig(), example_inputs=inputs)
    encoder = [(t.module.removeprefix("led.encoder.layers.0.self_attn."), t.roles) for t in plan.targets
               if t.module.startswith("led.encoder.layers.0.")]
    assert encoder == [("longformer_self_attn.query", ("q",)), ("longformer_self_attn.key", ("k",)),
                       ("longformer_self_attn.value", ("v",)), ("output", ("o",))]
    assert len(plan.targets) == 24
    ref = model(**inputs).logits
    ac.transform(model, ac.AdaMoLEConfig(num_experts=2, rank=2), example_inputs=inputs)
    torch.testing.assert_close(model(**inputs).logits, ref, rtol=0, atol=1e-5)


class NoOutputProjection(nn.Module):
    """Pre-norm layers whose attention merges its heads straight into the residual (no o), then an MLP: the
    first projection forward of the attention output is past the residual add, in the next block."""

    def __init__(self, d: int = 16, heads: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "n1": nn.LayerNorm(d), "q": nn.Linear(d, d), "k": nn.Linear(d, d), "v": nn.Linear(d, d),
            "n2": nn.LayerNorm(d), "fc1": nn.Linear(d, 2 * d), "fc2": nn.Linear(2 * d, d)}) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, S, D]
        b, s, d = x.shape
        for blk in self.blocks:
            h = blk["n1"](x)
            q, k, v = (blk[r](h).view(b, s, self.heads, -1).transpose(1, 2) for r in "qkv")
            x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
            x = x + blk["fc2"](F.gelu(blk["fc1"](blk["n2"](x))))
        return x


def test_an_attention_without_o_has_none():
    """The walk to o stops where the attention output rejoins the stream it read (the residual add): no o, and
    fc1 / fc2 are the MLP's up / down (before, fc1 was called o, and roles 'all' found no MLP)."""
    model, x = NoOutputProjection(), torch.randn(2, 5, 16)
    plan = ac.plan(model, ac.AdaMoLEConfig(roles=("q", "k", "v", "up", "down")), example_inputs=(x,))
    got = {(t.module, t.roles) for t in plan.targets}
    assert got == {(f"blocks.{i}.{m}", (r,)) for i in range(2) for m, r in
                   (("q", "q"), ("k", "k"), ("v", "v"), ("fc1", "up"), ("fc2", "down"))}
    assert "no projection found for role o" in plan.describe()
    with pytest.raises(ValueError, match=r"roles \('o',\) were asked for, but only \('q', 'k', 'v'"):
        ac.plan(model, ac.AdaMoLEConfig(), example_inputs=(x,))
