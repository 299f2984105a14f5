"""Bad input gives a clear exception and leaves the model exactly as before (state_dict tensors, module types,
requires_grad flags, train/eval flags)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import amole_compile as ac
from amole_compile.model.projection import ProjectionAdapters as AdapterGroup
from amole_compile.model.state import adapter_state

from models import build, seal

CFG = ac.AdaMoLEConfig(num_experts=4, rank=2)


def snapshot(model):
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "types": [(n, type(m)) for n, m in model.named_modules()],
            "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
            "training": [(n, m.training) for n, m in model.named_modules()]}


def assert_unchanged(model, snap):
    now = snapshot(model)
    assert now["types"] == snap["types"]
    assert now["grad"] == snap["grad"]
    assert now["training"] == snap["training"]
    assert now["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert now["state"][k].dtype == v.dtype and torch.equal(now["state"][k], v), k


def _randomise(model):
    with torch.no_grad():
        for p in adapter_state(model).values():
            p.normal_()


# ---- transform ----------------------------------------------------------------------------------------

def test_transform_twice():
    model = ac.transform(build("llama"), CFG)
    _randomise(model)
    snap = snapshot(model)
    for cfg in (CFG, ac.AdaMoLEConfig(method="lora")):
        with pytest.raises(ValueError, match="LlamaForCausalLM holds an adapter named .default. already"):
            ac.transform(model, cfg)
        assert_unchanged(model, snap)


class FunctionalProj(nn.Module):
    """A projection that is not an nn.Linear: its own weight, applied with F.linear."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)

    def forward(self, x):
        return F.linear(x, self.weight)


class CustomAttention(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q = FunctionalProj(d, d)
        self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):  # x [B, S, D]
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d))


def test_unsupported_layer_type():
    model = CustomAttention()
    x = torch.randn(2, 5, 16)
    ref = model(x)
    snap = snapshot(model)
    with pytest.raises(TypeError) as info:
        ac.transform(model, CFG, example_inputs=(x,))
    msg = str(info.value)
    assert re.search(r"\bq\b", msg) and "FunctionalProj" in msg
    assert_unchanged(model, snap)  # all or nothing: k, v, o were not swapped either
    assert torch.equal(model(x), ref)
    ac.transform(model, ac.AdaMoLEConfig(exclude="^q$"), example_inputs=(x,))  # excluding it works
    assert sorted(t.module for t in ac.targets(model)) == ["k", "o", "v"]


@pytest.mark.parametrize("config,exc,pattern", [
    ({"rank": 4}, TypeError, "config must be an AdaMoLEConfig, got dict"),
    ("adamole", TypeError, "config must be an AdaMoLEConfig, got str"),
])
def test_transform_rejects_non_config(config, exc, pattern):
    model = build("gpt2")
    snap = snapshot(model)
    with pytest.raises(exc, match=pattern):
        ac.transform(model, config)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("kwargs,field", [({"rank": 0}, "rank"), ({"dropout": 1.0}, "dropout"),
                                          ({"method": "moe"}, "method"), ({"roles": ("q", "x")}, "roles")])
def test_invalid_config_values(kwargs, field):
    model = build("gpt2")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=rf"AdaMoLEConfig\.{field} must be"):
        ac.transform(model, ac.AdaMoLEConfig(**kwargs))
    assert_unchanged(model, snap)


def test_transform_rejects_bad_model_and_inputs():
    with pytest.raises(TypeError, match="nn.Module, GraphModule or ExportedProgram, got str"):
        ac.transform("llama", CFG)
    model = CustomAttention()
    snap = snapshot(model)
    with pytest.raises(ac.passes.capture.CaptureError, match="CustomAttention.*example_inputs"):
        ac.transform(model, CFG)  # not a HF model: needs example inputs
    with pytest.raises(TypeError, match="example_inputs must be"):
        ac.transform(model, CFG, example_inputs=5)
    assert_unchanged(model, snap)


# ---- load_adapters -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = ac.transform(build("llama"), CFG)
    _randomise(model)
    return ac.save_adapters(model, tmp_path_factory.mktemp("saved"))


@pytest.fixture
def adir(saved, tmp_path):
    """A fresh copy of the saved adapters to break."""
    return shutil.copytree(saved, tmp_path / "adapters")


def _edit_tensors(path, fn):
    tensors = load_file(str(path / "adapters.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "adapters.safetensors"))
    seal(path)  # the config's manifest names the edited file


def _fails_cleanly(model, path, exc, pattern):
    snap = snapshot(model)
    with pytest.raises(exc) as info:
        ac.load_adapters(model, path)
    assert re.search(pattern, str(info.value)), str(info.value)
    assert_unchanged(model, snap)
    return info.value


@pytest.mark.parametrize("transformed", [False, True], ids=["fresh", "transformed"])
@pytest.mark.parametrize("case", ["no_dir", "no_config", "no_weights", "bad_json", "json_list", "not_ours",
                                  "bad_safetensors", "missing_key", "unexpected_key", "wrong_shape",
                                  "bad_targets"])
def test_load_errors_leave_model_unchanged(case, transformed, adir):
    model = build("llama")
    if transformed:
        ac.transform(model, CFG)
        _randomise(model)
    key = "model.layers.1.self_attn.k_proj.adapters.default.k.lora_B"
    cfg_file, w_file = adir / "amole_config.json", adir / "adapters.safetensors"
    if case == "no_dir":
        shutil.rmtree(adir)
        _fails_cleanly(model, adir, FileNotFoundError, re.escape(str(adir)))
    elif case == "no_config":
        cfg_file.unlink()
        _fails_cleanly(model, adir, FileNotFoundError, "no amole_config.json .*" + re.escape(str(adir)))
    elif case == "no_weights":
        w_file.unlink()
        _fails_cleanly(model, adir, FileNotFoundError, re.escape(str(w_file)))
    elif case == "bad_json":
        cfg_file.write_text('{"format": "amole_compile", "config": {')
        _fails_cleanly(model, adir, ValueError, re.escape(str(cfg_file)) + ".*not valid JSON")
    elif case == "json_list":
        cfg_file.write_text("[1, 2]")
        _fails_cleanly(model, adir, ValueError, "JSON object")
    elif case == "not_ours":
        cfg_file.write_text(json.dumps({"format": "something_else"}))
        _fails_cleanly(model, adir, ValueError, "neither an amole_compile nor an upstream")
    elif case == "bad_safetensors":
        w_file.write_bytes(b"\x00\x01 this is not a safetensors file")
        seal(adir)
        _fails_cleanly(model, adir, ValueError, re.escape(str(w_file)) + ".*safetensors")
    elif case == "missing_key":
        _edit_tensors(adir, lambda t: t.pop(key))
        _fails_cleanly(model, adir, ValueError, "missing key " + re.escape(repr(key)))
    elif case == "unexpected_key":
        extra = "model.layers.0.self_attn.q_proj.adapters.default.q.extra"
        _edit_tensors(adir, lambda t: t.__setitem__(extra, t[key].clone()))
        _fails_cleanly(model, adir, ValueError, f"unexpected key '{extra}'")
    elif case == "wrong_shape":
        _edit_tensors(adir, lambda t: t.__setitem__(key, torch.zeros(32, 7)))
        _fails_cleanly(model, adir, ValueError, re.escape(repr(key)) + r".*\(32, 7\).*\(32, 8\)")
    elif case == "bad_targets":
        meta = json.loads(cfg_file.read_text())
        del meta["adapters"]["default"]["targets"][0]["roles"]
        cfg_file.write_text(json.dumps(meta))
        _fails_cleanly(model, adir, ValueError, r"adapters\['default'\]\.targets\[0\]\.roles is missing")
    assert any(isinstance(m, AdapterGroup) for m in model.modules()) == transformed


@pytest.mark.parametrize("arch,overrides,pattern", [
    ("gpt2", {}, "model.layers.0.self_attn.q_proj"),  # a different architecture
    ("llama", {"hidden_size": 32}, r"q_proj.*64->64.*32->64"),  # a different size (head_dim stays 16)
    ("llama", {"num_hidden_layers": 1}, "model.layers.1"),  # fewer layers
    ("llama", {"num_hidden_layers": 3}, "model.layers.2"),  # more layers
])
def test_mismatched_model(saved, arch, overrides, pattern):
    model = build(arch, **overrides)
    err = _fails_cleanly(model, saved, ValueError, pattern)
    assert not any(isinstance(m, AdapterGroup) for m in model.modules()), err


def test_mismatched_config_on_a_transformed_model(saved):
    model = ac.transform(build("llama"), ac.AdaMoLEConfig(num_experts=2, rank=4))  # same K = E * R
    _fails_cleanly(model, saved, ValueError, r"num_experts \(model 2, file 4\)")


# ---- reference checkpoints ------------------------------------------------------------------------------

def _reference_dir(path, tensors, config):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        torch.save(tensors, path / "adapter_model.bin")
    return path


def _ref_tensors(model, e=2, r=2, skip=None):
    out = {}
    for i in range(2):
        for n in "qkvo":
            fqn = f"model.layers.{i}.self_attn.{n}_proj"
            lin = model.get_submodule(fqn)
            for j in range(e):
                out[f"base_model.model.{fqn}.lora_A.{j}.weight"] = torch.randn(r, lin.in_features)
                out[f"base_model.model.{fqn}.lora_B.{j}.weight"] = torch.randn(lin.out_features, r)
            out[f"base_model.model.{fqn}.lora_gating.weight"] = torch.randn(e, lin.in_features)
    out.pop(skip, None)
    return out


REF_CFG = {"peft_type": "MOLE", "r": 2, "lora_alpha": 4, "num_experts": 2, "top_k": 1}


def test_reference_errors(tmp_path):
    model = build("llama")
    p = _reference_dir(tmp_path / "noweights", None, REF_CFG)
    _fails_cleanly(model, p, FileNotFoundError, "adapter_model.safetensors.*adapter_model.bin.*" + re.escape(str(p)))
    missing = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.1.weight"
    p = _reference_dir(tmp_path / "missing", _ref_tensors(model, skip=missing), REF_CFG)
    _fails_cleanly(model, p, ValueError, "missing key.*model.layers.1.self_attn.v_proj.*lora_A.1.weight")
    p = _reference_dir(tmp_path / "badtype", _ref_tensors(model), {**REF_CFG, "peft_type": "IA3"})
    _fails_cleanly(model, p, ValueError, "peft_type 'IA3'")
    p = _reference_dir(tmp_path / "corrupt", None, REF_CFG)
    (p / "adapter_model.bin").write_bytes(b"not a pickle")
    _fails_cleanly(model, p, ValueError, "adapter_model.bin.*weights_only=True")
    bad = _ref_tensors(model)
    bad["base_model.model.model.layers.0.self_attn.q_proj.lora_magic.weight"] = torch.zeros(1)
    p = _reference_dir(tmp_path / "unexpected", bad, REF_CFG)
    _fails_cleanly(model, p, ValueError, "unexpected key.*lora_magic")
    shape = _ref_tensors(model)
    shape["base_model.model.model.layers.0.self_attn.q_proj.lora_gating.weight"] = torch.zeros(2, 63)
    p = _reference_dir(tmp_path / "shape", shape, REF_CFG)
    _fails_cleanly(model, p, ValueError, r"q_proj.*\(2, 63\).*\(2, 64\)")
    assert not any(isinstance(m, AdapterGroup) for m in model.modules())


def test_reference_checkpoint_on_fused_projection(tmp_path):
    model = build("gpt2")
    t = {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(2, 64),
         "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.zeros(192, 2)}
    p = _reference_dir(tmp_path, t, {"peft_type": "LORA", "r": 2, "lora_alpha": 4})
    _fails_cleanly(model, p, ValueError, "transformer.h.0.attn.c_attn is a fused projection")


def test_a_model_adapted_by_peft_is_refused_by_name():
    """PEFT's lora_B feeds q like q_proj: discovery would adapt it as a second q projection and freeze PEFT's
    parameters, silently."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for call in (lambda: ac.plan(model), lambda: ac.transform(model, ac.AdaMoLEConfig())):
        with pytest.raises(ac.ForeignAdaptersError, match=r"already adapted by PEFT \(LoraModel at base_model\)"
                                                          r".*merge_and_unload\(\)"):
            call()
    assert not ac.is_transformed(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    plan = ac.plan(build("llama"))  # the same architecture, unadapted: a plan made elsewhere is refused too
    with pytest.raises(ac.ForeignAdaptersError):
        ac.transform(model, ac.AdaMoLEConfig(), plan=plan)
    assert len(ac.targets(ac.transform(model.unload(), ac.AdaMoLEConfig()))) == 8  # the way out it names
