"""Named adapters: several on one model (their own E, rank, method, roles), switching, deleting, saving and
loading per name, and directories of the previous (unnamed) format."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import amole_compile as ac
from amole_compile.model.modules import ExpertSet

from models import build, ids, logits, seal

CFG_A = ac.AdaMoLEConfig(num_experts=4, rank=2, roles=("q", "v"))
CFG_B = ac.AdaMoLEConfig(num_experts=2, rank=4, method="mole", top_k=1, roles=("q", "k", "v", "o"))
CFG_C = ac.AdaMoLEConfig(method="lora", rank=3, roles=("k", "o"))


def randomise(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".adapters.{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if n.endswith("lora_B") else 0.5))


def three(arch="llama"):
    """(untouched base, the same base with adapters a, b, c, randomised)."""
    base = build(arch)
    model = copy.deepcopy(base)
    for i, (name, cfg) in enumerate((("a", CFG_A), ("b", CFG_B), ("c", CFG_C))):
        ac.transform(model, cfg, adapter_name=name)
        randomise(model, name, i)
    return base, model.eval()


def alone(base, model, name, tmp_path):
    """A fresh copy of the base with only adapter `name`, through a save / load of that name."""
    d = tmp_path / f"only_{name}"
    ac.save_adapters(model, d, adapter_name=name)
    return ac.load_adapters(copy.deepcopy(base), d).eval()


def test_each_named_adapter_computes_what_it_computes_alone(tmp_path):
    base, model = three()
    assert ac.adapter_names(model) == ["a", "b", "c"] and ac.active_adapter(model) == "c"
    x = ids(2, 9)
    ref = logits(base, x)
    roles = {"a": CFG_A.roles, "b": CFG_B.roles, "c": CFG_C.roles}
    for name in "abc":
        ac.set_active_adapter(model, name)
        assert sorted(r for t in ac.targets(model) for r in t.roles) == sorted(roles[name] * 2)
        solo = alone(base, model, name, tmp_path)
        assert ac.adapter_names(solo) == [name]
        got = logits(model, x)
        assert not torch.allclose(got, ref, atol=1e-4)
        torch.testing.assert_close(got, logits(solo, x), rtol=0, atol=1e-6)
    ac.set_active_adapter(model, None)
    torch.testing.assert_close(logits(model, x), ref, rtol=0, atol=0)


def test_only_the_active_adapter_trains():
    _, model = three()
    for name in ("a", "b"):
        ac.set_active_adapter(model, name)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(f".adapters.{name}." in n for n in trainable)
        model.train()
        model(input_ids=ids(2, 6), labels=ids(2, 6)).loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (f".adapters.{name}." in n), n
        model.zero_grad(set_to_none=True)
    model.eval()


def test_save_all_and_load_all_keep_names_active_and_values(tmp_path):
    base, model = three()
    ac.set_active_adapter(model, "b")
    ac.save_adapters(model, tmp_path / "all")
    meta = json.loads((tmp_path / "all" / "amole_config.json").read_text())
    assert meta["format_version"] == 2 and meta["active"] == "b" and list(meta["adapters"]) == ["a", "b", "c"]
    keys = load_file(tmp_path / "all" / "adapters.safetensors")
    assert {k.split(".adapters.")[1].split(".")[0] for k in keys} == {"a", "b", "c"}
    loaded = ac.load_adapters(copy.deepcopy(base), tmp_path / "all").eval()
    assert ac.adapter_names(loaded) == ["a", "b", "c"] and ac.active_adapter(loaded) == "b"
    x = ids(2, 7)
    for name in "abc":
        ac.set_active_adapter(model, name)
        ac.set_active_adapter(loaded, name)
        assert torch.equal(logits(model, x), logits(loaded, x))


def test_load_one_name_from_a_directory_and_under_a_new_name(tmp_path):
    base, model = three()
    ac.save_adapters(model, tmp_path / "all")
    one = ac.load_adapters(copy.deepcopy(base), tmp_path / "all", adapter_name="b")
    assert ac.adapter_names(one) == ["b"]
    ac.save_adapters(model, tmp_path / "a", adapter_name="a")
    target = copy.deepcopy(base)
    ac.load_adapters(target, tmp_path / "a", adapter_name="first")  # a directory of one adapter: renamed
    ac.load_adapters(target, tmp_path / "all", adapter_name="c")  # added beside it; the active one stays
    assert ac.adapter_names(target) == ["first", "c"] and ac.active_adapter(target) == "first"
    x = ids(2, 5)
    ac.set_active_adapter(model, "a")
    assert torch.equal(logits(target.eval(), x), logits(model, x))
    with pytest.raises(ValueError, match=r"holds adapters \['a', 'b', 'c'\], not 'z'"):
        ac.load_adapters(copy.deepcopy(base), tmp_path / "all", adapter_name="z")


def test_version_1_directories_load_as_default(tmp_path):
    """A directory in the previous format (keys without the adapter name) keeps loading."""
    base, model = three()
    ac.set_active_adapter(model, "a")
    ac.save_adapters(model, tmp_path / "v1", adapter_name="a")
    meta = json.loads((tmp_path / "v1" / "amole_config.json").read_text())
    entry = meta["adapters"]["a"]
    (tmp_path / "v1" / "amole_config.json").write_text(json.dumps(
        {"format": "amole_compile", "format_version": 1, "config": entry["config"], "targets": entry["targets"]}))
    tensors = load_file(tmp_path / "v1" / "adapters.safetensors")
    save_file({k.replace(".adapters.a.", ".adapters."): v for k, v in tensors.items()},
              tmp_path / "v1" / "adapters.safetensors")
    loaded = ac.load_adapters(copy.deepcopy(base), tmp_path / "v1").eval()
    assert ac.adapter_names(loaded) == ["default"]
    assert torch.equal(logits(loaded, ids(2, 6)), logits(model, ids(2, 6)))


def test_hf_save_pretrained_keeps_every_adapter(tmp_path):
    import transformers as tf

    _, model = three()
    ac.set_active_adapter(model, "a")
    model.save_pretrained(tmp_path / "m")
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ac.load_adapters(back, tmp_path / "m")
    assert ac.adapter_names(back) == ["a", "b", "c"] and ac.active_adapter(back) == "a"
    x = ids(1, 6)
    assert torch.equal(logits(back.eval(), x), logits(model, x))


def test_delete_adapter(caplog):
    base, model = three()
    x = ids(2, 6)
    ac.set_active_adapter(model, "a")
    want_a = logits(model, x)
    ac.delete_adapter(model, "b")
    assert ac.adapter_names(model) == ["a", "c"] and ac.active_adapter(model) == "a"
    assert not any(".adapters.b." in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model, x), want_a)
    with caplog.at_level(logging.WARNING, logger="amole_compile"):
        ac.delete_adapter(model, "a")  # the active one: the first remaining becomes active, said in the log
    assert ac.active_adapter(model) == "c" and "deleted the active adapter 'a'" in caplog.text
    q = model.model.layers[0].self_attn.q_proj  # only a and b adapted q: its base layer is back
    assert type(q) is torch.nn.Linear
    ac.delete_adapter(model, "c")  # the last one: the model is the base again
    assert not ac.is_transformed(model)
    assert set(dict(model.named_parameters())) == set(dict(base.named_parameters()))
    torch.testing.assert_close(logits(model, x), logits(base, x), rtol=0, atol=0)


def test_bad_names_are_refused_and_change_nothing():
    _, model = three()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for call, pattern in [
        (lambda: ac.set_active_adapter(model, "z"), r"unknown adapter 'z'.*\['a', 'b', 'c'\]"),
        (lambda: ac.delete_adapter(model, "z"), r"unknown adapter 'z'.*\['a', 'b', 'c'\]"),
        (lambda: ac.transform(model, CFG_A, adapter_name="a"), "holds an adapter named 'a' already"),
        (lambda: ac.transform(model, CFG_A, adapter_name="x.y"), "adapter_name must be a non-empty string"),
        (lambda: ac.transform(model, CFG_A, adapter_name=""), "adapter_name must be a non-empty string"),
        (lambda: ac.transform(model, CFG_A, adapter_name="half"), "'half' is the name of an nn.Module attribute"),
        (lambda: ac.save_adapters(model, "/tmp/never", adapter_name="z"), "unknown adapter 'z'"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            call()
    assert ac.adapter_names(model) == ["a", "b", "c"] and ac.active_adapter(model) == "c"
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def test_failed_load_of_a_second_adapter_leaves_the_first(tmp_path):
    base, model = three()
    ac.save_adapters(model, tmp_path / "all")
    target = ac.transform(copy.deepcopy(base), CFG_A, adapter_name="mine")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    tensors = load_file(tmp_path / "all" / "adapters.safetensors")
    key = next(k for k in tensors if ".adapters.c." in k)
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, tmp_path / "all" / "adapters.safetensors")
    seal(tmp_path / "all")
    with pytest.raises(ValueError, match="shape"):
        ac.load_adapters(target, tmp_path / "all")
    assert ac.adapter_names(target) == ["mine"] and ac.active_adapter(target) == "mine"
    after = target.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_sites_of_each_adapter_keep_their_own_config():
    _, model = three()
    sites = {n.split(".adapters.")[1].split(".")[0]: m for n, m in model.named_modules()
             if isinstance(m, ExpertSet)}
    assert (sites["a"].method, sites["a"].num_experts, sites["a"].rank) == ("adamole", 4, 2)
    assert (sites["b"].method, sites["b"].num_experts, sites["b"].rank) == ("mole", 2, 4)
    assert (sites["c"].method, sites["c"].num_experts, sites["c"].rank) == ("lora", 1, 3)
