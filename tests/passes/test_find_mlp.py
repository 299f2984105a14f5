"""Feed-forward roles (gate, up, down) found by structure: gated MLPs, a fused gate_up projection (Phi-3),
two-matrix MLPs (GPT-2, BERT, OPT), MoE routers and 3-D experts left out with the reason; the role shorthands;
roles the architecture lacks; save / load, expert statistics and ONNX export with feed-forward roles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf

import amole_compile as ac
from amole_compile.config import ROLES

from models import VOCAB, build, build_matrix, ids

CFG = dict(num_experts=2, rank=2, dropout=0.0)


def layer0(plan):
    return [(t.module, {r: t.columns(r) for r in t.roles}) for t in plan.targets if ".0." in f".{t.module}."]


def full(n):
    return tuple(range(n))


def test_role_shorthands():
    assert ac.AdaMoLEConfig().roles == ("q", "k", "v", "o")
    assert ac.AdaMoLEConfig(roles="mlp").roles == ("gate", "up", "down")
    assert ac.AdaMoLEConfig(roles="all").roles == ROLES
    assert ac.AdaMoLEConfig(roles=("v", "mlp")).roles == ("v", "gate", "up", "down")
    assert ac.AdaMoLEConfig.from_json(ac.AdaMoLEConfig(roles="all").to_json()).roles == ROLES
    with pytest.raises(ValueError, match="roles"):
        ac.AdaMoLEConfig(roles=("mlp", "up"))  # up twice


@pytest.mark.parametrize("arch,want", [
    ("llama", [("model.layers.0.mlp.gate_proj", {"gate": full(128)}), ("model.layers.0.mlp.up_proj", {"up": full(128)}),
               ("model.layers.0.mlp.down_proj", {"down": full(64)})]),
    ("phi3", [("model.layers.0.mlp.gate_up_proj", {"gate": full(128), "up": tuple(range(128, 256))}),
              ("model.layers.0.mlp.down_proj", {"down": full(64)})]),
    ("gpt2", [("transformer.h.0.mlp.c_fc", {"up": full(256)}), ("transformer.h.0.mlp.c_proj", {"down": full(64)})]),
    ("opt", [("model.decoder.layers.0.fc1", {"up": full(128)}), ("model.decoder.layers.0.fc2", {"down": full(64)})]),
    ("bert", [("bert.encoder.layer.0.intermediate.dense", {"up": full(128)}),
              ("bert.encoder.layer.0.output.dense", {"down": full(64)})]),
])
def test_mlp_roles(arch, want):
    plan = ac.plan(build(arch), ac.AdaMoLEConfig(roles="mlp"))
    assert layer0(plan) == want
    assert len(plan.targets) == 2 * len(want)
    attn_and_mlp = ac.plan(build(arch), ac.AdaMoLEConfig(roles="all"))
    assert {r for t in attn_and_mlp.targets for r in t.roles} == {"q", "k", "v", "o"} | {
        r for _, roles in want for r in roles}


def test_gated_attention_is_not_an_mlp():
    """Qwen3-Next: q_proj's gate half goes through a sigmoid into o_proj; only the shared expert is an MLP, the
    router is never adapted and the stacked experts are listed as skipped."""
    plan = ac.plan(build_matrix("qwen3_next_gated"), ac.AdaMoLEConfig(roles="all"))
    mods = [m for m, _ in layer0(plan)]
    assert mods[:4] == [f"layers.0.self_attn.{n}_proj" for n in "qkvo"]
    assert mods[4:] == [f"layers.0.mlp.shared_expert.{n}_proj" for n in ("gate", "up", "down")]
    skipped = "\n".join(map(str, plan.report.skipped))
    assert "layers.0.mlp.gate: an MoE router" in skipped
    assert "layers.0.mlp.experts.gate_up_proj: MoE experts stored as a 3-D parameter" in skipped


def test_roles_absent_from_the_architecture():
    model = build("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel: roles \('gate',\) were asked for.*'up', 'down'"):
        ac.transform(model, ac.AdaMoLEConfig(roles=("q", "gate")))
    assert not ac.core.is_transformed(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_mlp_roles_on_an_all_moe_model():
    """Every feed-forward block is MoE (Mixtral): the error names the MoE blocks, says the 3-D experts are skipped
    and lists what can be adapted; the model is left as it was."""
    model = build_matrix("mixtral_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        ac.transform(model, ac.AdaMoLEConfig(roles="mlp"))
    msg = str(err.value)
    assert msg.startswith("MixtralModel: roles ('gate', 'up', 'down') were asked for, but every feed-forward block is "
                          "a mixture of experts (layers.0.mlp, layers.1.mlp): MoE expert weights stored as 3-D "
                          "parameters are skipped"), msg
    assert "layers.0.mlp.experts.gate_up_proj [4, 256, 64]; layers.0.mlp.experts.down_proj [4, 64, 128]" in msg
    assert msg.endswith("Adaptable here: 8 projection(s) with roles ('q', 'k', 'v', 'o')"), msg
    assert not ac.core.is_transformed(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class _RoutedMoE(torch.nn.Module):
    """Hand-written: attention, then 2-D expert Linears fed the tokens an argmax router sends them
    (`nonzero`: sizes the capture leaves symbolic)."""

    def __init__(self, d=32, heads=4, vocab=50):
        super().__init__()
        lin = torch.nn.Linear
        self.heads, self.emb, self.head = heads, torch.nn.Embedding(vocab, d), lin(d, vocab)
        self.q, self.k, self.v, self.o, self.router = lin(d, d), lin(d, d), lin(d, d), lin(d, d), lin(d, 2)
        self.ups = torch.nn.ModuleList(lin(d, 2 * d) for _ in range(2))
        self.downs = torch.nn.ModuleList(lin(2 * d, d) for _ in range(2))

    def forward(self, tokens):
        h = self.emb(tokens)
        b, s, d = h.shape

        def split(t):
            return t.reshape(b, s, self.heads, d // self.heads).transpose(1, 2)

        a = torch.nn.functional.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        h = (h + self.o(a.transpose(1, 2).reshape(b, s, d))).reshape(b * s, d)
        choice, out = self.router(h).argmax(-1), torch.zeros_like(h)
        for e in range(2):
            idx = (choice == e).nonzero().squeeze(-1)
            out = out.index_add(0, idx, self.downs[e](torch.nn.functional.gelu(self.ups[e](h[idx]))))
        return self.head(h + out).reshape(b, s, -1)


def test_experts_fed_routed_tokens_are_an_moe_not_a_crash():
    # the probe took the capture's symbolic sizes for an example shape: RuntimeError "SymIntArrayRef expected to
    # contain only concrete integers" from inside find_mlp
    model = _RoutedMoE()
    example = (torch.randint(0, 50, (2, 8)),)
    with pytest.raises(ValueError, match=r"every feed-forward block is a mixture of experts \(router\): its experts "
                                         r"are not adapted \(each gets the tokens the router sends it"):
        ac.transform(model, ac.AdaMoLEConfig(roles="all"), example_inputs=example)
    assert not ac.core.is_transformed(model)
    plan = ac.plan(model, ac.AdaMoLEConfig(), example_inputs=example)
    assert [t.module for t in plan.targets] == ["q", "k", "v", "o"]


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_transform_save_load_and_stats(arch, tmp_path):
    x = ids(2, 8, seed=1)
    torch.manual_seed(0)
    model = build(arch)
    ref = model(input_ids=x).logits
    ac.transform(model, ac.AdaMoLEConfig(roles="all", **CFG))
    assert torch.allclose(model(input_ids=x).logits, ref, atol=1e-6, rtol=0)
    with torch.no_grad():
        for _, group in ac.core.adapter_groups(model):
            for site in group.values():
                site.lora_B.normal_(0, 0.05)
    out = model(input_ids=x).logits
    assert not torch.allclose(out, ref)
    ac.save_adapters(model, tmp_path / "a")
    torch.manual_seed(0)
    fresh = ac.load_adapters(build(arch), tmp_path / "a")
    assert torch.equal(fresh(input_ids=x).logits, out)
    assert {r for t in ac.targets(fresh) for r in t.roles} == set(ROLES)
    stats = ac.expert_stats(fresh)
    assert {s.role for s in stats.sites} == set(ROLES)
    ac.plot_expert_stats(stats, tmp_path / "stats.png")
    assert (tmp_path / "stats.png").stat().st_size > 0


@pytest.mark.slow
def test_onnx_export_with_mlp_roles(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "export"))
    from onnx_helpers import assert_logits_close, batch, randomise, reference_logits

    torch.manual_seed(0)
    model = randomise(ac.transform(build("llama", num_hidden_layers=1), ac.AdaMoLEConfig(roles="all"))).eval()
    lm = ac.OnnxLM(ac.export_onnx(model, tmp_path / "all.onnx"))
    ids_, mask = batch(2, 6, seed=4)
    assert_logits_close(reference_logits(model, ids_, mask), lm.logits(ids_, mask), mask)


def test_no_feed_forward_found_says_what_one_looks_like():
    """BitNet normalises act(gate) * up before down_proj: no elementwise path, so no MLP roles. The error says
    the rule (it only listed the attention roles found)."""
    cfg = tf.BitNetConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
    model = tf.BitNetForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match=r"roles \('gate', 'up', 'down'\) were asked for, but only \('q', 'k', "
                                         r"'v', 'o'\) were found; no feed-forward block was found: a down "
                                         r"projection's input must be an elementwise function"):
        ac.plan(model, ac.AdaMoLEConfig(roles="all"))
