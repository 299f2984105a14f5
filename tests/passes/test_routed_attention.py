"""Attention whose projections are routed experts (JetMoE's mixture of attention heads: q and o are 3-D expert
parameters fed the tokens a router picks; k and v one plain projection).

Before: `plan` crashed inside torch (GuardOnDataDependentSymNode, reading a routed size as an int), and with that
fixed alone it named the attention router q and the next MoE's router o (no error, the wrong modules adapted).
Now: the walks from an attention role do not step along integer or bool tensors (`_routing.carries_values`),
a router is never the o found downstream, and the roles the experts compute are reported with the parameter
that computes them.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import amole_compile as ac
from amole_compile.passes._fx import concrete_int, concrete_shape

from models import VOCAB


def jetmoe() -> torch.nn.Module:
    cfg = tf.JetMoeConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2,
                          kv_channels=16, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
                          max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return tf.JetMoeForCausalLM(cfg).eval()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def test_plan_finds_k_v_and_says_who_computes_q_and_o():
    model = jetmoe()
    plan = ac.plan(model, ac.AdaMoLEConfig(roles=("k", "v")))
    got = [(t.module, t.roles) for t in plan.targets]
    assert got == [(f"model.layers.{i}.self_attention.kv_proj", ("k", "v")) for i in range(2)]
    skipped = {(s.module, s.reason): s.detail for s in plan.report.skipped}
    for i in range(2):
        attn = f"model.layers.{i}.self_attention.experts"
        assert skipped[(f"{attn}.input_linear.weight", "moe_experts")].startswith("computes role q: MoE experts")
        assert skipped[(f"{attn}.output_linear.weight", "moe_experts")].startswith("computes role o: MoE experts")
        # the next MoE's router, first downstream of the attention, is reported, never made o
        assert "an MoE router" in skipped[(f"model.layers.{i}.mlp.router.layer", "router_reached")]
    assert all("router" not in t.module for t in plan.targets)


def test_default_roles_raise_naming_the_experts():
    model = jetmoe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"roles \('q', 'o'\) were asked for, but its architecture has \('k', 'v'\)"
                       r".*input_linear\.weight: computes role q: MoE experts stored as a 3-D parameter"):
        ac.transform(model, ac.AdaMoLEConfig())
    assert not ac.is_transformed(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_k_v_adapters_train_and_keep_outputs_at_init():
    model = jetmoe()
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    ac.transform(model, ac.AdaMoLEConfig(num_experts=2, rank=2, roles=("k", "v"), dropout=0.0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=1e-6)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
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
