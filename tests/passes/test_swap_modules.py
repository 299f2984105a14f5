"""Module rewrite: per architecture, exact output at init, training lowers the loss and touches only adapter
parameters, base weights unchanged, `.base_layer` FQNs, state_dict round trip, generate(); the train/eval mode of
the new modules; a Llama-2-7B-shaped model on the meta device.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import amole_compile as ac
from amole_compile.model.modules import ExpertSet
from amole_compile.model.projection import AdaMoLELinear

from models import ENCODERS, build, ids, logits

CFG = ac.AdaMoLEConfig(num_experts=4, rank=2)
PARAMS_PER_SITE = {"adamole": 5, "mole": 3, "lora": 2}


def loss_of(model, x):
    return model(input_ids=x, labels=x).loss


def _base_key(key: str, adapted: set[str]) -> str:
    """The state_dict key a base-model key has after the swap (`<module>.base_layer.<param>`)."""
    module, _, param = key.rpartition(".")
    return f"{module}.base_layer.{param}" if module in adapted else key


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2", "gpt_neox", "phi3", "opt", "bert"])
def test_swap_train_and_reload(arch):
    model = build(arch)
    x = ids(2, 8, seed=1)
    ref = logits(model, x)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    before_modules = dict(model.named_modules())

    assert ac.transform(model, CFG) is model
    found = ac.targets(model)
    assert sum(len(t.roles) for t in found) == 8
    # FQNs: each projection is an AdaMoLELinear keeping the very same original object as .base_layer
    for t in found:
        new, old = model.get_submodule(t.module), before_modules[t.module]
        assert isinstance(new, AdaMoLELinear) and new.base_layer is old and new.weight is old.weight
    adapted = {t.module for t in found}
    sd = model.state_dict()
    adapter_keys = {k for k in sd if ".adapters." in k}
    assert set(sd) == {_base_key(k, adapted) for k in base_sd} | adapter_keys
    assert len(adapter_keys) == 8 * PARAMS_PER_SITE["adamole"]
    # exact output at init
    model.eval()
    assert torch.equal(logits(model, x), ref)
    # only adapter parameters train
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".adapters." in n} and len(trainable) == 40
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():
        before = loss_of(model, x).item()
    model.train()
    for _ in range(5):
        opt.zero_grad()
        loss = loss_of(model, x) + 1e-3 * ac.aux_loss(model)
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (".adapters." in n), n
        opt.step()
    model.eval()
    with torch.no_grad():
        after = loss_of(model, x).item()
    assert after < before - 0.1, (before, after)
    for site in (m for m in model.modules() if isinstance(m, ExpertSet)):
        assert site.lora_B.abs().max() > 0  # B was initialised to zero and trained
    sd = model.state_dict()
    for k, v in base_sd.items():  # base weights untouched
        assert torch.equal(sd[_base_key(k, adapted)], v), k
    trained = logits(model, x)
    assert not torch.allclose(trained, ref)
    # state_dict loads back (strict) into a fresh base model given the same plan
    fresh = ac.transform(build(arch), CFG, plan=ac.plan(build(arch), CFG)).eval()
    fresh.load_state_dict(sd)
    assert torch.equal(logits(fresh, x), trained)
    if arch not in ENCODERS:  # generate() with the trained adapters (KV cache, one token per step)
        out = model.generate(x, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape == (2, 11) and torch.equal(out[:, :8], x)
        assert torch.equal(out[:, 8], trained[:, -1].argmax(-1))


def test_mole_and_lora_sites():
    for method, n in (("mole", 3), ("lora", 2)):
        cfg = ac.AdaMoLEConfig(method=method, rank=2)
        model = ac.transform(build("gpt2"), cfg)
        sites = [m for m in model.modules() if isinstance(m, ExpertSet)]
        assert len(sites) == 8 and all(s.method == method for s in sites)
        assert sum(1 for n_, p in model.named_parameters() if p.requires_grad) == 8 * n


def test_requires_grad_restored_by_untransform():
    model = build("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x = ids()
    ref = logits(model, x)
    ac.untransform(ac.transform(model, CFG))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(isinstance(m, AdaMoLELinear) for m in model.modules())
    assert torch.equal(logits(model, x), ref)


@pytest.mark.parametrize("training", [False, True])
def test_transform_keeps_train_eval_mode(training):
    """The swapped-in modules take the mode of the model: an eval model stays in eval mode everywhere (no dropout,
    no aux recording, deterministic output), a training model stays in training mode."""
    model = build("llama").train(training)
    ac.transform(model, ac.AdaMoLEConfig(dropout=0.5))
    modes = {n: m.training for n, m in model.named_modules()}
    assert set(modes.values()) == {training}, sorted(n for n, t in modes.items() if t != training)[:4]
    if not training:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, ExpertSet):
                    m.lora_B.normal_()
        x = ids()
        assert torch.equal(logits(model, x), logits(model, x))
        assert ac.aux_loss(model).item() == 0.0


def test_transform_of_a_training_model_stays_in_training_mode():
    model = build("bert").train()
    ac.transform(model, CFG)
    assert model.training and model.bert.encoder.layer[0].attention.self.query.base_layer.training


@pytest.mark.slow
def test_llama2_7b_shape_on_meta_device():
    cfg = tf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         vocab_size=32000)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg)
    ac.transform(model, ac.AdaMoLEConfig())
    found = ac.targets(model)
    assert sum(len(t.roles) for t in found) == 128 and len(found) == 128
    assert sorted({t.roles for t in found}) == [("k",), ("o",), ("q",), ("v",)]
    sites = [m for m in model.modules() if isinstance(m, ExpertSet)]
    assert len(sites) == 128
    adapter_params = [p for s in sites for p in s.parameters()]
    assert len(adapter_params) == 128 * 5 and all(p.is_meta for p in adapter_params)
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())
    q = model.model.layers[31].self_attn.q_proj.group["q"]
    assert q.lora_A.shape == (32, 4096) and q.lora_B.shape == (4096, 32) and q.gate.shape == (8, 4096)
