"""Roles computed by something no adapter can wrap, reported as such and never given to the next projection along.

JetMoE (mixture of attention heads): q and o are 3-D expert parameters fed the tokens a router picks; k and v one
plain projection.

Before: `plan` crashed inside torch (GuardOnDataDependentSymNode, reading a routed size as an int), and with that
fixed alone it named the attention router q and the next MoE's router o (no error, the wrong modules adapted).
Now: the walks from an attention role do not step along integer or bool tensors (`_routing.carries_values`),
the walks stop at a product by a parameter of more than 2 dimensions (the experts) and report it as computing
the role, and a router is never the o found downstream.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import amole_compile as ac
from amole_compile.passes._fx import concrete_int, concrete_shape

from models import VOCAB, ids


def jetmoe() -> torch.nn.Module:
    cfg = tf.JetMoeConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2,
                          kv_channels=16, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
                          max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return tf.JetMoeForCausalLM(cfg).eval()


def test_plan_finds_k_v_and_says_who_computes_q_and_o():
    model = jetmoe()
    plan = ac.plan(model, ac.AdaMoLEConfig(roles=("k", "v")))
    got = [(t.module, t.roles) for t in plan.targets]
    assert got == [(f"model.layers.{i}.self_attention.kv_proj", ("k", "v")) for i in range(2)]
    skipped = {(s.module, s.reason): s.detail for s in plan.report.skipped}
    for i in range(2):  # the walks stop at the experts' products, and say so
        attn = f"model.layers.{i}.self_attention.experts"
        assert skipped[(f"{attn}.input_linear.weight", "param_3d")].startswith(
            "computes role q: a parameter of more than 2 dimensions (stacked experts, or per-head weights) [4, 32, 64]")
        assert skipped[(f"{attn}.output_linear.weight", "param_3d")].startswith("computes role o: a parameter")
    assert all("router" not in t.module for t in plan.targets)


def test_default_roles_raise_naming_the_experts():
    model = jetmoe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"roles \('q', 'o'\) were asked for, but only \('k', 'v'\) were found"
                       r".*input_linear\.weight: computes role q: a parameter of more than 2 dimensions"):
        ac.transform(model, ac.AdaMoLEConfig())
    assert not ac.is_transformed(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_k_v_adapters_train_and_keep_outputs_at_init():
    model = jetmoe()
    x = ids(2, 7)
    with torch.no_grad():
        ref = model(input_ids=x).logits
    ac.transform(model, ac.AdaMoLEConfig(num_experts=2, rank=2, roles=("k", "v"), dropout=0.0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ref, rtol=0, atol=1e-6)
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    trained = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.split(".self_attention.")[1].startswith("kv_proj") for n in trained)
    # (lora_A's gradient is zero while B is: a fresh adapter adds exactly 0)
    assert all(g is not None and g.abs().sum() > 0 for n, g in trained.items() if "lora_B" in n or "threshold" in n)


def test_a_size_that_depends_on_values_is_not_read_as_an_int():
    """An unbacked SymInt (a count of routed tokens) has no concrete value: None, not an error from torch."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    u = env.create_unbacked_symint()
    assert concrete_int(u) is None and concrete_int(7) == 7
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(shape_env=env) as mode:
        t = torch.empty(u, 4)
        known = torch.empty(3, 4)
    assert concrete_shape(t) is None and concrete_shape(known) == (3, 4) and concrete_shape(1) is None
    del mode


def test_xlnet_per_head_weights_are_named_not_passed_over():
    """XLNet's q, k, v and o are [d_model, heads, head_dim] parameters used through einsum. Before: `plan` could not
    build its example inputs (max_position_embeddings is -1, "no limit"); the walk from the attention output
    passed the o einsum and would have called the feed-forward's first Linear o."""
    cfg = tf.XLNetConfig(vocab_size=VOCAB, d_model=64, n_layer=2, n_head=4, d_inner=128)
    assert cfg.max_position_embeddings == -1
    model = tf.XLNetLMHeadModel(cfg).eval()
    with pytest.raises(ac.NoAttentionFound) as info:
        ac.plan(model, ac.AdaMoLEConfig())
    msg = str(info.value)
    assert "found 2 attention site(s) but no projection feeding them" in msg
    assert "transformer.layer.0.rel_attn.q: computes role q: a parameter of more than 2 dimensions" in msg
    assert "[64, 4, 16]" in msg and "layer_1" not in msg
