"""The patch table: every row documented and pinned to the versions it was checked with, and a test per row
that the reason still holds at those versions (without the patch the library misbehaves) and that the patch
installs and comes off."""

from __future__ import annotations

import functools
import importlib.metadata
import os

import pytest
import torch
import transformers as tf
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from safetensors.torch import load_file

import amole_compile as ac
from amole_compile.checkpoint.pretrained import base_state_dict, load_pre_hook, split_state
from amole_compile.integrations.loss import post_forward, pre_forward
from amole_compile.integrations.patches import PATCHES, ROWS, SCOPED, DynamoFlag, detach
from amole_compile.model.state import state_of

from models import build, ids, logits

CFG = ac.AdaMoLEConfig(dropout=0.0)
SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32)


def _version(package: str) -> Version | None:
    try:
        return Version(importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.mark.parametrize("row", PATCHES, ids=[p.name for p in PATCHES])
def test_every_row_is_documented_and_pinned(row):
    assert row.target and row.why and row.checked and row.pin
    assert row.when in ("transform", "save_pretrained")
    assert (row.install is not None and row.remove is not None) == (row.when == "transform")
    assert row.when == "transform" or row.name in SCOPED
    for package, spec in row.pin.items():
        version = _version(package)
        if version is None:
            continue  # an optional library that is not installed: the row never applies
        assert version in SpecifierSet(spec), (f"{row.name} was checked with {row.checked}; {package} {version} "
                                               f"is outside {spec}: check the patch again and update the row")


def _transformed(arch="llama"):
    model = ac.transform(build(arch), CFG)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    return model


def _remove(model, name):
    """Remove one installed row, as untransform would."""
    record = state_of(model)
    token = record.token(name)
    record.undo.remove((name, token))
    ROWS[name].remove(model, token)


def test_aux_loss_hooks():
    model = _transformed().train()
    x = ids(2, 8)
    assert pre_forward in model._forward_pre_hooks.values() and post_forward in model._forward_hooks.values()
    with torch.no_grad():
        out = model(input_ids=x, labels=x)
        task = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                                 x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, task + CFG.aux_loss_coef * out.aux_loss)
    _remove(model, "aux_loss_hooks")
    with torch.no_grad():
        plain = model(input_ids=x, labels=x)
    assert "aux_loss" not in plain and not model._forward_hooks and not model._forward_pre_hooks
    torch.testing.assert_close(plain.loss, task)  # the reason: HF's loss alone has no aux


def test_resume_hook():
    model = _transformed()
    state = {**base_state_dict(model), **{k: v for k, v in model.state_dict().items() if ".adapters." in k}}
    model.load_state_dict(state)  # base names go under .base_layer.
    _remove(model, "resume_hook")
    assert not any(getattr(h, "hook", h) is load_pre_hook for h in model._load_state_dict_pre_hooks.values())
    with pytest.raises(RuntimeError, match="base_layer"):  # the reason: the plain load misses the renamed keys
        model.load_state_dict(state)


def test_save_pretrained(tmp_path):
    model = _transformed()
    x = ids(2, 8)
    model.save_pretrained(tmp_path / "ours")
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ac.untransform(model)
    torch.testing.assert_close(logits(reloaded, x), logits(model.eval(), x), rtol=0, atol=0)
    model = _transformed()
    type(model).save_pretrained(model, tmp_path / "plain")  # the inherited method: the reason
    keys = load_file(tmp_path / "plain" / "model.safetensors")
    assert any(".base_layer." in k for k in keys)  # renamed keys, which from_pretrained re-initialises
    _remove(model, "save_pretrained")
    assert "save_pretrained" not in model.__dict__


def test_enable_input_require_grads():
    model = build("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()  # HF's hook, a torch.compile graph break: the reason
    assert model._require_grads_hooks
    ac.transform(model, CFG)
    assert state_of(model).token("enable_input_require_grads") == "disabled"
    assert not getattr(model, "_require_grads_hooks", None)  # taken off: non-reentrant needs no input grad
    model.enable_input_require_grads()  # the override skips it
    assert not getattr(model, "_require_grads_hooks", None)
    ac.untransform(model)
    assert "enable_input_require_grads" not in model.__dict__ and model._require_grads_hooks  # put back


@functools.cache
def _base_dir(tmp):
    build("llama", **SMALL).save_pretrained(tmp)
    return tmp


def _four_bit(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    d = _base_dir(str(tmp_path_factory.getbasetemp() / "patch_base"))
    config = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.float32)
    return tf.AutoModelForCausalLM.from_pretrained(d, quantization_config=config, device_map="cpu")


def test_trainer_peft_flag(tmp_path_factory, tmp_path):
    model = _four_bit(tmp_path_factory)
    args = tf.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="purely quantized"):  # the reason
        tf.Trainer(model=model, args=args, train_dataset=[])
    ac.transform(model, CFG)
    assert state_of(model).token("trainer_peft_flag") and model._hf_peft_config_loaded
    tf.Trainer(model=model, args=args, train_dataset=[])
    ac.untransform(model)
    assert model._hf_peft_config_loaded is False


def test_bnb_cpu_repack(tmp_path_factory):
    model = _four_bit(tmp_path_factory)
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    repacks = {m.support_avx512bf16_for_cpu for m in layers}
    ac.transform(model, CFG)
    token = state_of(model).token("bnb_cpu_repack")
    assert (token is not None) == (True in repacks)  # installed only where bitsandbytes would repack
    assert not any(m.support_avx512bf16_for_cpu for m in layers)
    ac.untransform(model)
    assert {m.support_avx512bf16_for_cpu for m in layers} == repacks


def test_bnb_cpu_repack_reason_state_dict_scrambles_the_scales(tmp_path_factory):
    """The row's second reason, at the pinned bitsandbytes: a repacked layer passes no gradient through, and the
    first state_dict() unpacks it in place with an unnested state's scales transposed (2e-2 on the logits
    here). undo_cpu_repack puts it back in block order: stable under state_dict, gradient through."""
    from amole_compile.integrations.quantized import cpu_repacked, undo_cpu_repack

    model, x = _four_bit(tmp_path_factory), ids(2, 7)
    if not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules()):
        pytest.skip("bitsandbytes repacks 4-bit layers only on AVX512-BF16 CPUs")
    with torch.no_grad():
        model.eval()(input_ids=x)
        packed = model.train()(input_ids=x).logits
    layers = [m for m in model.modules() if cpu_repacked(m)]
    assert layers
    probe = torch.randn(3, layers[0].in_features, requires_grad=True)
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        layers[0].train()(probe).sum().backward()
    assert probe.grad is None or not probe.grad.any()  # no gradient through a repacked layer (the first reason)
    with torch.no_grad():
        model.state_dict()
        assert (model(input_ids=x).logits - packed).abs().max() > 5e-3  # the scales scrambled (the second)
    model = _four_bit(tmp_path_factory)
    with torch.no_grad():
        model.eval()(input_ids=x)
        for m in model.modules():
            if cpu_repacked(m):
                undo_cpu_repack(m)
                m.support_avx512bf16_for_cpu = False
        before = model.train()(input_ids=x).logits
        model.state_dict()
        torch.testing.assert_close(model(input_ids=x).logits, before, rtol=0, atol=0)
    layer = next(m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu"))
    probe = torch.randn(3, layer.in_features, requires_grad=True)
    layer(probe).sum().backward()
    assert probe.grad.any()


def test_scoped_save_patches(tmp_path_factory, tmp_path):
    """peft_flag_during_save and quantizer_state_dict: a quantized transformed base saved by the inherited method
    with the Trainer's flag on writes no base (it takes the save for a PEFT adapter's: under peft 0.21 transformers
    refuses that peft's version, under 0.22 it looks for PEFT's tuner layers and finds none), and with the flag off
    writes the adapted names; ours writes the base."""
    model = _four_bit(tmp_path_factory)
    ac.transform(model, CFG)
    base, _ = split_state(model, model.state_dict())
    with pytest.raises((ValueError, UnboundLocalError)):
        type(model).save_pretrained(model, tmp_path / "flag_on", state_dict=base)
    assert not (tmp_path / "flag_on" / "model.safetensors").exists()
    with SCOPED["peft_flag_during_save"](model):
        type(model).save_pretrained(model, tmp_path / "no_rename", state_dict=base)
    assert any(".base_layer." in k for k in load_file(tmp_path / "no_rename" / "model.safetensors"))
    assert model._hf_peft_config_loaded  # back on after the call
    model.save_pretrained(tmp_path / "ours")
    keys = load_file(tmp_path / "ours" / "model.safetensors")
    assert keys and not any(".base_layer." in k or ".adapters." in k for k in keys)
    assert "get_state_dict_and_metadata" not in vars(model.hf_quantizer)  # the patch came off
    assert sorted(os.listdir(tmp_path / "ours")) >= ["adapters.safetensors", "amole_config.json"]


def test_dynamo_flag_row(monkeypatch):
    monkeypatch.setattr(DynamoFlag, "_live", {})
    monkeypatch.setattr(DynamoFlag, "_saved", None)
    cfg = torch._dynamo.config  # not monkeypatch.setattr: on torch's config module its undo deletes the entry
    before = getattr(cfg, DynamoFlag.NAME)
    setattr(cfg, DynamoFlag.NAME, False)
    try:
        model = _transformed()
        assert isinstance(state_of(model).token("dynamo_checkpoint_side_effects"), DynamoFlag)
        assert getattr(cfg, DynamoFlag.NAME) is True
        detach(model, state_of(model))
        assert getattr(cfg, DynamoFlag.NAME) is False and state_of(model).undo == []
    finally:
        setattr(cfg, DynamoFlag.NAME, before)


def test_mha_fastpath_row(monkeypatch):
    """Without the row, an adapted TransformerEncoderLayer in inference takes torch's fused fast path, which
    reads the attention's (and the feed-forward's) weights itself: the adapters are bypassed and the output is
    the base model's. With it, the adapters run; it comes off with the last model holding it."""
    from torch import nn

    from amole_compile.integrations.patches import MhaFastpath

    monkeypatch.setattr(MhaFastpath, "_live", {})
    monkeypatch.setattr(MhaFastpath, "_saved", None)
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(True)
    try:
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
        x = torch.randn(2, 5, 16)
        with torch.no_grad():
            base = layer(x)
        ac.transform(layer, ac.AdaMoLEConfig(num_experts=2, rank=2, dropout=0.0), example_inputs=(x,))
        assert isinstance(state_of(layer).token("mha_fastpath_off"), MhaFastpath)
        assert torch.backends.mha.get_fastpath_enabled() is False
        with torch.no_grad():
            for name, p in layer.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0, 0.1)
            adapted = layer(x)
            torch.backends.mha.set_fastpath_enabled(True)  # the reason: without the row, the fast path runs
            layer._forward_hooks.clear()  # (the aux-loss hooks on a model that is the layer itself stop it too)
            layer._forward_pre_hooks.clear()
            bypassed = layer(x)
            torch.backends.mha.set_fastpath_enabled(False)
        assert (adapted - base).abs().max() > 1e-3
        torch.testing.assert_close(bypassed, base, rtol=0, atol=1e-5)
        detach(layer, state_of(layer))
        assert torch.backends.mha.get_fastpath_enabled() is True
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
