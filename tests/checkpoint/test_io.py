"""save_adapters / load_adapters: bit-exact round trip for every method and a fused architecture, the files
written (atomically), loading into a fresh base model, and import of hand-built reference-repo checkpoints
(ADAMOLE / MOLE / LORA, adapter_model.bin and .safetensors) checked against `LoopAdaMoLE` and by hand.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import amole_compile as ac
from amole_compile.model.projection import AdaMoLELinear
from amole_compile.model.state import adapter_state

from models import build, ids, logits
from upstream_loop import LoopAdaMoLE

FILES = ["adapters.safetensors", "amole_config.json"]
METHOD_CFGS = {
    "adamole": ac.AdaMoLEConfig(num_experts=4, rank=3, alpha=6.0, max_threshold=0.2),
    "mole": ac.AdaMoLEConfig(method="mole", num_experts=4, rank=2, top_k=3),
    "lora": ac.AdaMoLEConfig(method="lora", rank=5, alpha=10.0),
}


def randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("arch,method", [("llama", "adamole"), ("llama", "mole"), ("llama", "lora"),
                                         ("gpt2", "adamole")])
def test_round_trip_is_bit_exact(arch, method, tmp_path):
    cfg = METHOD_CFGS[method]
    base = build(arch)
    fresh, other = copy.deepcopy(base), (copy.deepcopy(base) if (arch, method) == ("llama", "adamole") else None)
    model = ac.transform(base, cfg)
    randomise(model)
    model.eval()
    x = ids(2, 8, seed=2)
    want = logits(model, x)
    out = ac.save_adapters(model, tmp_path / "a" / "b")
    assert out == tmp_path / "a" / "b" and sorted(os.listdir(out)) == FILES  # exactly these, no temp files
    meta = json.loads((out / "amole_config.json").read_text())
    assert meta["format"] == "amole_compile" and meta["format_version"] == 2 and meta["active"] == "default"
    assert ac.AdaMoLEConfig.from_dict(meta["adapters"]["default"]["config"]) == cfg
    assert len(meta["adapters"]["default"]["targets"]) == len(ac.targets(model))

    assert ac.load_adapters(fresh, out) is fresh  # a fresh base model is transformed, then filled
    fresh.eval()
    assert sorted(ac.targets(fresh), key=str) == sorted(ac.targets(model), key=str)
    saved, loaded = adapter_state(model), adapter_state(fresh)
    assert saved.keys() == loaded.keys()
    for k in saved:
        assert loaded[k].dtype == saved[k].dtype and torch.equal(loaded[k], saved[k]), k
    assert torch.equal(logits(fresh, x), want)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(
        n for n, p in model.named_parameters() if p.requires_grad)
    if other is not None:  # loading into an already transformed model overwrites its adapters
        ac.transform(other, cfg)
        ac.load_adapters(other, out)
        other.eval()
        assert torch.equal(logits(other, x), want)
    # saving again over the same directory keeps exactly the two files
    ac.save_adapters(fresh, out)
    assert sorted(os.listdir(out)) == FILES


def test_a_model_that_ran_no_adapter_loads_running_none(tmp_path):
    """Saved with no adapter active (set_active_adapter(None)): the manifest says `"active": null`, and a base
    model loading it holds the adapter but runs none, as the saved model did (before, it ran the adapter: logits
    off by its whole effect). Activated afterwards, it is the saved adapter."""
    base = build("llama")
    fresh = copy.deepcopy(base)
    model = ac.transform(base, METHOD_CFGS["adamole"])
    randomise(model)
    model.eval()
    x = ids(2, 8, seed=2)
    with_adapter = logits(model, x)
    ac.set_active_adapter(model, None)
    want = logits(model, x)
    out = ac.save_adapters(model, tmp_path / "none")
    assert json.loads((out / "amole_config.json").read_text())["active"] is None
    ac.load_adapters(fresh, out)
    fresh.eval()
    assert ac.active_adapter(fresh) is None and ac.adapter_names(fresh) == ["default"]
    assert torch.equal(logits(fresh, x), want) and not torch.allclose(want, with_adapter, atol=1e-3)
    ac.set_active_adapter(fresh, "default")
    assert torch.equal(logits(fresh, x), with_adapter)


def test_failed_write_leaves_no_temp_files_and_old_files_intact(tmp_path, monkeypatch):
    import safetensors.torch as st

    model = ac.transform(build("llama"), METHOD_CFGS["lora"])
    ac.save_adapters(model, tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in FILES}
    randomise(model, seed=3)

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        ac.save_adapters(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == FILES
    assert {f: (tmp_path / f).read_bytes() for f in FILES} == before


def test_save_requires_adapters(tmp_path):
    with pytest.raises(ValueError, match="no AdaMoLE adapters"):
        ac.save_adapters(build("llama"), tmp_path)
    assert os.listdir(tmp_path) == []


# ---- reference-repo checkpoints -----------------------------------------------------------------------

PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}


def reference_checkpoint(model, peft_type, e, r, roles=("q", "k", "v", "o"), seed=0):
    """Tensor dict in the upstream layout (docs/upstream_format.md), with the duplicate moe_layer keys (garbage
    shapes) too."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(2):
        for role in roles:
            fqn = f"model.layers.{i}.self_attn.{PROJ[role]}"
            lin = model.get_submodule(fqn)
            d_in, d_out = lin.in_features, lin.out_features
            p = f"base_model.model.{fqn}"
            if peft_type == "LORA":
                tensors[f"{p}.lora_A.weight"] = torch.randn(r, d_in, generator=g) * 0.3
                tensors[f"{p}.lora_B.weight"] = torch.randn(d_out, r, generator=g) * 0.3
                continue
            for j in range(e):
                tensors[f"{p}.lora_A.{j}.weight"] = torch.randn(r, d_in, generator=g) * 0.3
                tensors[f"{p}.lora_B.{j}.weight"] = torch.randn(d_out, r, generator=g) * 0.3
                tensors[f"{p}.moe_layer.experts.{j}.lora_A.weight"] = torch.full((1, 3), 7.0)  # ignored
                tensors[f"{p}.moe_layer.experts.{j}.lora_B.weight"] = torch.full((2,), 7.0)  # ignored
            tensors[f"{p}.lora_gating.weight"] = torch.randn(e, d_in, generator=g)
            if peft_type == "ADAMOLE":
                tensors[f"{p}.lora_threshold.weight"] = torch.randn(1, d_in, generator=g) * 0.2
                tensors[f"{p}.lora_threshold.bias"] = torch.randn(1, generator=g) * 0.2
    return tensors


def write_reference(path, tensors, config, fmt):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    if fmt == "bin":
        torch.save(tensors, path / "adapter_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
    return path


def loop_from(tensors, fqn, peft_type, e, r, alpha, d_in, d_out, max_threshold=None, top_k=2):
    """A LoopAdaMoLE holding the checkpoint's weights for module fqn."""
    method = {"ADAMOLE": "adamole", "MOLE": "mole", "LORA": "lora"}[peft_type]
    ref = LoopAdaMoLE(d_in, d_out, e, r, alpha, method=method, max_threshold=max_threshold, top_k=top_k).eval()
    p = f"base_model.model.{fqn}"
    with torch.no_grad():
        for j, ex in enumerate(ref.experts):
            sfx = "" if method == "lora" else f".{j}"
            ex.lora_A.weight.copy_(tensors[f"{p}.lora_A{sfx}.weight"])
            ex.lora_B.weight.copy_(tensors[f"{p}.lora_B{sfx}.weight"])
        if method != "lora":
            ref.gate.weight.copy_(tensors[f"{p}.lora_gating.weight"])
        if method == "adamole":
            ref.threshold_fn.weight.copy_(tensors[f"{p}.lora_threshold.weight"])
            ref.threshold_fn.bias.copy_(tensors[f"{p}.lora_threshold.bias"])
    return ref


@pytest.mark.parametrize("peft_type,e,r,extra,fmt", [
    ("ADAMOLE", 4, 2, {"max_threshold": 0.3}, "bin"),
    ("ADAMOLE", 3, 2, {}, "safetensors"),  # max_threshold defaults to 1 / E
    ("MOLE", 4, 3, {"top_k": 2}, "safetensors"),
    ("LORA", 1, 4, {}, "bin"),
])
def test_reference_checkpoint_import(peft_type, e, r, extra, fmt, tmp_path):
    base = build("llama")
    tensors = reference_checkpoint(base, peft_type, e, r)
    alpha = 8.0
    config = {"peft_type": peft_type, "r": r, "lora_alpha": alpha, "lora_dropout": 0.05,
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], **extra}
    if peft_type != "LORA":
        config["num_experts"] = e
    path = write_reference(tmp_path / "ref", tensors, config, fmt)
    ac.load_adapters(base, path)
    base.eval()
    found = ac.targets(base)
    assert len(found) == 8 and sorted(r_ for t in found for r_ in t.roles) == sorted("qkvo" * 2)
    site_cfg = base.model.layers[0].self_attn.q_proj.group.config
    assert (site_cfg.method, site_cfg.num_experts, site_cfg.rank, site_cfg.alpha, site_cfg.dropout) == (
        peft_type.lower(), e, r, alpha, 0.05)
    cap = extra.get("max_threshold", 1 / e) if peft_type == "ADAMOLE" else 0.0
    assert site_cfg.threshold_cap == pytest.approx(cap, rel=1e-15)
    x = torch.randn(19, 64)
    for i in range(2):
        for role, name in PROJ.items():
            fqn = f"model.layers.{i}.self_attn.{name}"
            layer = base.get_submodule(fqn)
            assert isinstance(layer, AdaMoLELinear) and layer.roles == (role,)
            site = layer.group[role]
            p = f"base_model.model.{fqn}"
            sfx = (lambda j: "") if peft_type == "LORA" else (lambda j: f".{j}")
            assert torch.equal(site.lora_A, torch.cat([tensors[f"{p}.lora_A{sfx(j)}.weight"] for j in range(e)], 0))
            assert torch.equal(site.lora_B, torch.cat([tensors[f"{p}.lora_B{sfx(j)}.weight"] for j in range(e)], 1))
            ref = loop_from(tensors, fqn, peft_type, e, r, alpha, layer.in_features, layer.out_features,
                            max_threshold=extra.get("max_threshold"), top_k=extra.get("top_k", 2))
            with torch.no_grad():  # float32 model against the reference in float64
                got = layer(x).double()
                want = layer.base_layer.double()(x.double()) + ref.double()(x.double())
                layer.base_layer.float()
                torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)
                if peft_type == "LORA":  # by hand: W0 x + b + (alpha / r) B A x
                    a, b = tensors[f"{p}.lora_A.weight"], tensors[f"{p}.lora_B.weight"]
                    torch.testing.assert_close(layer(x), layer.base_layer(x) + alpha / r * (x @ a.t() @ b.t()),
                                               rtol=1e-5, atol=5e-5)
    assert logits(base, ids()).shape == (2, 8, 128)


def test_reference_bin_and_safetensors_load_identically(tmp_path):
    m1, m2 = build("llama"), build("llama")
    tensors = reference_checkpoint(m1, "ADAMOLE", 4, 2)
    config = {"peft_type": "ADAMOLE", "r": 2, "lora_alpha": 4, "num_experts": 4, "max_threshold": 0.25}
    ac.load_adapters(m1, write_reference(tmp_path / "bin", tensors, config, "bin"))
    ac.load_adapters(m2, write_reference(tmp_path / "st", tensors, config, "safetensors"))
    s1, s2 = adapter_state(m1), adapter_state(m2)
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_reference_checkpoint_with_some_projections(tmp_path):
    model = build("llama")
    tensors = reference_checkpoint(model, "MOLE", 2, 2, roles=("q", "v"))
    config = {"peft_type": "MOLE", "r": 2, "lora_alpha": 2, "num_experts": 2, "top_k": 1,
              "target_modules": ["q_proj", "v_proj"]}
    ac.load_adapters(model, write_reference(tmp_path, tensors, config, "bin"))
    assert [(t.module, t.roles) for t in ac.targets(model)] == [
        (f"model.layers.{i}.self_attn.{n}_proj", (n,)) for i in (0, 1) for n in "qv"]
    assert type(model.model.layers[0].self_attn.k_proj) is torch.nn.Linear
    assert type(model.model.layers[1].self_attn.o_proj) is torch.nn.Linear


def test_load_into_eval_model_stays_in_eval_mode(tmp_path):
    """An eval-mode base model loaded with adapters (dropout 0.05 in the file) serves deterministically."""
    ac.save_adapters(ac.transform(build("llama"), METHOD_CFGS["adamole"]), tmp_path)
    model = build("llama")
    assert not model.training
    ac.load_adapters(model, tmp_path)
    randomise(model)
    assert [n for n, m in model.named_modules() if m.training] == []
    x = ids()
    assert torch.equal(logits(model, x), logits(model, x))


@pytest.mark.parametrize("options", [{}, {"use_rslora": True}], ids=["lora", "rslora"])
def test_peft_lora_import_is_exact(options, tmp_path):
    """A PEFT LoRA saved by peft itself: plain and rsLoRA (scale alpha / sqrt(r)) give PEFT's logits."""
    peft = pytest.importorskip("peft")
    base = build("llama")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], **options))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval().save_pretrained(tmp_path)
    model = ac.load_adapters(copy.deepcopy(base), tmp_path).eval()
    x = ids(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, x), logits(pm, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("options,match", [
    ({"use_dora": True}, "use_dora"), ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 4}}, "alpha_pattern"), ({"lora_bias": True}, "lora_bias")])
def test_peft_options_we_cannot_express_are_rejected(options, match, tmp_path):
    """DoRA, per-module ranks / alphas and LoRA biases: a clear error naming the option, the model untouched."""
    peft = pytest.importorskip("peft")
    base = build("llama")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"],
                                                                   **options))
    pm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        ac.load_adapters(base, tmp_path)
    assert not ac.is_transformed(base)
