"""The architecture matrix: tiny transformers models built from config (decoder-only, encoder-only,
encoder-decoder, vision, two-tower, MoE, MLA, sliding-window, soft-capped, fused / grouped / multi-query QKV),
each planned without example inputs or module names, with the exact projections, roles and columns per block.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import amole_compile as ac
from amole_compile.model.state import projections
from amole_compile.passes.capture import synthesize_inputs

from models import MATRIX, build_matrix

pytestmark = pytest.mark.slow
LAYERS = 2
D, HD = 64, 16  # model width, head dim


def cols(spec) -> tuple[int, ...]:
    return tuple(range(spec.start, spec.stop)) if isinstance(spec, slice) else tuple(spec)


def per_group(width: int, groups: int, lo: int, hi: int) -> tuple[int, ...]:
    """Columns [lo, hi) inside each of `groups` consecutive blocks of `width` columns."""
    return tuple(g * width + c for g in range(groups) for c in range(lo, hi))


def qkvo(q="q_proj", k="k_proj", v="v_proj", o="o_proj", kv=D, prefix=""):
    """Separate q, k, v, o projections (kv: the width of k and v)."""
    return [(prefix + q, {"q": slice(0, D)}), (prefix + k, {"k": slice(0, kv)}), (prefix + v, {"v": slice(0, kv)}),
            (prefix + o, {"o": slice(0, D)})]


def fused(name, o, q, k, v):
    return [(name, {"q": q, "k": k, "v": v}), (o, {"o": slice(0, D)})]


GQA = dict(kv=32)  # 2 kv heads of 16
MLA_KV_B = {"k": per_group(20, 4, 0, 8), "v": per_group(20, 4, 8, 20)}  # per head: 8 nope k | 12 v
# arch -> [(block name template, [(module inside the block, {role: columns})])]
EXPECTED = {
    "llama": [("layers.{i}.self_attn.", qkvo(**GQA))],
    "mistral_sliding": [("layers.{i}.self_attn.", qkvo(**GQA))],
    "qwen3": [("layers.{i}.self_attn.", qkvo(**GQA))],
    "olmo_clip_qkv": [("layers.{i}.self_attn.", qkvo())],
    "olmo2": [("layers.{i}.self_attn.", qkvo())],
    "gemma2_softcap": [("layers.{i}.self_attn.", qkvo(**GQA))],
    "cohere": [("layers.{i}.self_attn.", qkvo(**GQA))],
    "starcoder2": [("layers.{i}.self_attn.", qkvo(**GQA))],
    "stablelm": [("layers.{i}.self_attn.", qkvo(**GQA))],
    "phi": [("layers.{i}.self_attn.", qkvo(o="dense"))],
    "gptj": [("h.{i}.attn.", qkvo(o="out_proj"))],
    # CodeGen: qkv viewed as 4 blocks of 48 columns, each (q, v, k) of 16
    "codegen": [("h.{i}.attn.", fused("qkv_proj", "out_proj", per_group(48, 4, 0, 16), per_group(48, 4, 32, 48),
                                      per_group(48, 4, 16, 32)))],
    "gpt_bigcode_mqa": [("h.{i}.attn.", fused("c_attn", "c_proj", slice(0, 64), slice(64, 80), slice(80, 96)))],
    "falcon_mqa": [("h.{i}.self_attention.", fused("query_key_value", "dense", slice(0, 64), slice(64, 80),
                                                   slice(80, 96)))],
    # Falcon new architecture: per kv head, 2 query heads then its k and its v (64 columns)
    "falcon_grouped": [("h.{i}.self_attention.", fused("query_key_value", "dense", per_group(64, 2, 0, 32),
                                                       per_group(64, 2, 32, 48), per_group(64, 2, 48, 64)))],
    "bloom": [("h.{i}.self_attention.", fused("query_key_value", "dense", per_group(48, 4, 0, 16),
                                              per_group(48, 4, 16, 32), per_group(48, 4, 32, 48)))],
    "mpt_clip_qkv": [("blocks.{i}.attn.", fused("Wqkv", "out_proj", slice(0, 64), slice(64, 128),
                                                slice(128, 192)))],
    "dbrx_moe": [("blocks.{i}.norm_attn_norm.attn.", fused("Wqkv", "out_proj", slice(0, 64), slice(64, 96),
                                                           slice(96, 128)))],
    "mixtral_moe": [("layers.{i}.self_attn.", qkvo(**GQA))],
    "qwen3_moe": [("layers.{i}.self_attn.", qkvo(**GQA))],
    # gated attention: q_proj holds q and the output gate per head (32 columns each: 16 q, 16 gate)
    "qwen3_next_gated": [("layers.{i}.self_attn.", [("q_proj", {"q": per_group(32, 4, 0, 16)})] + qkvo(**GQA)[1:])],
    "gpt_oss_sinks": [("layers.{i}.self_attn.", qkvo(**GQA))],
    "llama4_text": [("layers.{i}.self_attn.", qkvo(**GQA))],
    "deepseek_v2_mla": [("layers.{i}.self_attn.", [("q_proj", {"q": slice(0, 64)}),
                                                  ("kv_a_proj_with_mqa", {"k": slice(16, 24)}),
                                                  ("kv_b_proj", MLA_KV_B), ("o_proj", {"o": slice(0, D)})])],
    "deepseek_v3_mla": [("layers.{i}.self_attn.", [("q_b_proj", {"q": slice(0, 64)}),
                                                  ("kv_a_proj_with_mqa", {"k": slice(16, 24)}),
                                                  ("kv_b_proj", MLA_KV_B), ("o_proj", {"o": slice(0, D)})])],
    "roberta": [("encoder.layer.{i}.attention.", qkvo("self.query", "self.key", "self.value", "output.dense"))],
    "electra": [("encoder.layer.{i}.attention.", qkvo("self.query", "self.key", "self.value", "output.dense"))],
    "distilbert": [("transformer.layer.{i}.attention.", qkvo("q_lin", "k_lin", "v_lin", "out_lin"))],
    "albert_shared": [("encoder.albert_layer_groups.0.albert_layers.0.attention.",
                       qkvo("query", "key", "value", "dense"))],
    "deberta_v2": [("encoder.layer.{i}.attention.",
                    qkvo("self.query_proj", "self.key_proj", "self.value_proj", "output.dense"))],
    "t5": [("encoder.block.{i}.layer.0.SelfAttention.", qkvo("q", "k", "v", "o")),
           ("decoder.block.{i}.layer.", qkvo("q", "k", "v", "o", prefix="0.SelfAttention.")
            + qkvo("q", "k", "v", "o", prefix="1.EncDecAttention."))],
    "bart": [("encoder.layers.{i}.self_attn.", qkvo(o="out_proj")),
             ("decoder.layers.{i}.", qkvo(o="out_proj", prefix="self_attn.")
              + qkvo(o="out_proj", prefix="encoder_attn."))],
    "whisper": [("encoder.layers.{i}.self_attn.", qkvo(o="out_proj")),
                ("decoder.layers.{i}.", qkvo(o="out_proj", prefix="self_attn.")
                 + qkvo(o="out_proj", prefix="encoder_attn."))],
    "vit": [("layers.{i}.attention.", qkvo())],
    "clip": [("text_model.encoder.layers.{i}.self_attn.", qkvo(o="out_proj")),
             ("vision_model.encoder.layers.{i}.self_attn.", qkvo(o="out_proj"))],
}
SHARED = {"albert_shared"}  # one block's parameters serve every layer: one target each


def test_matrix_is_large():
    assert len(MATRIX) >= 30 and set(EXPECTED) == set(MATRIX)


def expected(arch: str) -> list[tuple[str, dict[str, tuple[int, ...]]]]:
    layers = [0] if arch in SHARED else range(LAYERS)
    return [(tpl.format(i=i) + name, {r: cols(c) for r, c in roles.items()})
            for tpl, entries in EXPECTED[arch] for i in layers for name, roles in entries]


@pytest.mark.parametrize("arch", sorted(MATRIX))
def test_architecture(arch):
    model = build_matrix(arch)
    before = {n: set(m.__dict__) for n, m in model.named_modules(remove_duplicate=False)}
    plan = ac.plan(model)
    # plan leaves the model as it was: no module keeps an attribute its passes set (a recording wrapper)
    assert {n: set(m.__dict__) for n, m in model.named_modules(remove_duplicate=False)} == before
    got = [(t.module, {r: t.columns(r) for r in t.roles}) for t in plan.targets]
    assert got == expected(arch), plan.describe()
    for t in plan.targets:  # every role of a target owns disjoint columns
        owned = [c for r in t.roles for c in t.columns(r)]
        assert len(owned) == len(set(owned))
        assert model.get_submodule(t.module).weight.shape[0] == t.out_features
    skipped = [s for s in plan.report.skipped if s.reason != "not_captured"]
    assert skipped == [], skipped


def test_plan_lists_each_block():
    """Per block: what was found (or why it was not captured), and which blocks replay another's analysis."""
    text = ac.plan(build_matrix("dbrx_moe")).describe()
    assert "block blocks.0: not captured; its submodules were captured instead" in text
    assert "block blocks.0.norm_attn_norm: 1 attention site(s); roles q k v o; 0 skipped" in text
    assert "block blocks.1.norm_attn_norm: 1 attention site(s); roles q k v o; 0 skipped (analysis of " \
           "blocks.0.norm_attn_norm replayed)" in text
    assert "skipped: blocks.0.ffn.experts: not captured (GuardOnDataDependentSymNode" in text


def test_transform_keeps_outputs_at_init():
    """A few families end to end: adapted, the model computes exactly what the base model does, and each
    projection's batch dimension is found (`passes/find_rows.py`)."""
    for arch in ("falcon_mqa", "deepseek_v3_mla", "qwen3_next_gated", "whisper", "clip"):
        model = build_matrix(arch)
        inputs = synthesize_inputs(model)
        with torch.no_grad():
            ref = model(**inputs)
            ac.transform(model, ac.AdaMoLEConfig(num_experts=2, rank=2, dropout=0.0))
            got = model(**inputs)
        # every projection holds the batch's rows in dimension 0, encoder-decoder and two-tower included
        assert {n: h.batch_dim.dim for n, h in projections(model)} == dict.fromkeys(
            (n for n, _ in projections(model)), 0), arch
        for a, b in zip(ref.to_tuple(), got.to_tuple(), strict=True):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---- the columns are the right ones: perturb exactly one role's columns and watch q, k, v ----------------------

def recorded_qkv(model, inputs):
    calls, real = [], F.scaled_dot_product_attention

    def rec(q, k, v, *args, **kwargs):
        calls.append((q.detach().clone(), k.detach().clone(), v.detach().clone()))
        return real(q, k, v, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", rec)
        model(**inputs)
    return calls[0]


def perturb_columns(layer, columns):
    idx = torch.tensor(columns)
    with torch.no_grad():
        layer.weight[idx, :] += torch.randn(len(columns), layer.weight.shape[1])


@pytest.mark.parametrize("arch", ["falcon_grouped", "codegen", "deepseek_v2_mla", "qwen3_next_gated"])
def test_columns_feed_exactly_their_role(arch):
    model = build_matrix(arch)
    inputs = ac.passes.capture.synthesize_inputs(model)
    base = recorded_qkv(model, inputs)
    plan = ac.plan(model)
    layer0 = [t for t in plan.targets if ".0." in f".{t.module}." and "o" not in t.roles]
    for t in layer0:
        for role in t.roles:
            m2 = copy.deepcopy(model)
            perturb_columns(m2.get_submodule(t.module), t.columns(role))
            got = recorded_qkv(m2, inputs)
            for j, name in enumerate("qkv"):
                changed = not torch.equal(got[j], base[j])
                assert changed == (name == role), f"{t.module}: perturbing {role} columns, {name} changed={changed}"
        owned = {c for r in t.roles for c in t.columns(r)}
        rest = tuple(sorted(set(range(t.out_features)) - owned))
        if rest and arch == "qwen3_next_gated":  # the columns no role owns (the output gate) feed none of q, k, v
            m2 = copy.deepcopy(model)
            perturb_columns(m2.get_submodule(t.module), rest)
            assert all(torch.equal(a, b) for a, b in zip(recorded_qkv(m2, inputs), base, strict=True))
