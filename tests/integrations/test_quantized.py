"""Quantized bases on CPU: bitsandbytes 4-bit (nf4, fp4) and 8-bit, torchao int8 weight-only. Discovery runs on
the unquantized meta twin; the adapters wrap the quantized layers, start exact, train alone (plain loop, HF
Trainer, TRL), save / load round-trip through save_pretrained, compile; export_onnx refuses clearly."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import amole_compile as ac

from models import LMData, build, ids, tokenizer

# head_dim set too: build() overrides after the config computed it. bitsandbytes >= 0.50 repacks 4-bit weights for
# its CPU kernel on the first eval forward and asserts out_features % 32 == 0 (real models' projections are).
SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
KINDS = ["nf4", "fp4", "int8", "torchao-int8"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    build("llama", **SMALL).save_pretrained(d)
    return d


def quant_config(kind: str):
    if kind in ("nf4", "fp4"):
        pytest.importorskip("bitsandbytes")
        return tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.float32)
    if kind == "int8":
        pytest.importorskip("bitsandbytes")
        return tf.BitsAndBytesConfig(load_in_8bit=True)
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig

    return tf.TorchAoConfig(Int8WeightOnlyConfig())


def load(base_dir, kind: str):
    return tf.AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant_config(kind),
                                                   device_map="cpu")


def _randomise_b(model, std=0.05):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("kind", KINDS)
def test_transform_train_save_load(kind, base_dir, tmp_path):
    model = load(base_dir, kind)
    assert ac.plan(model, ac.AdaMoLEConfig()).targets  # found on the twin, named as in the quantized model
    x = ids(2, 7)
    with torch.no_grad():
        want = model.train()(input_ids=x).logits  # train mode: no bitsandbytes CPU repack before the transform
    ac.transform(model, ac.AdaMoLEConfig(dropout=0.0))
    assert len(ac.targets(model)) == 8
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, want, rtol=0, atol=0)  # exact at init
    adapters = {n: p for n, p in model.named_parameters() if ".adapters." in n}
    assert {p.dtype for p in adapters.values()} == {torch.float32}  # the compute dtype
    assert all(p.requires_grad == (n in adapters) for n, p in model.named_parameters())
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in adapters.values())
    _randomise_b(model)
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=x).logits
    model.save_pretrained(tmp_path)
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    ac.load_adapters(again, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(input_ids=x).logits, trained, rtol=1e-5, atol=1e-5)
    unq = tf.AutoModelForCausalLM.from_pretrained(base_dir)  # the adapters also load onto the unquantized base
    ac.load_adapters(unq, tmp_path)
    with pytest.raises(ac.OnnxExportError, match="quantized by"):
        ac.export_onnx(model, tmp_path / "m.onnx")


@pytest.mark.parametrize("kind", ["nf4", "torchao-int8"])
def test_compile(kind, base_dir):
    model = ac.transform(load(base_dir, kind), ac.AdaMoLEConfig(dropout=0.0))
    _randomise_b(model)
    model.train()
    x = ids(2, 7)
    eager = model(input_ids=x, labels=x).loss
    compiled = torch.compile(lambda t: model(input_ids=t, labels=t).loss, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager, rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("trainer", ["hf", "trl"])
def test_trainers_update_only_adapters(trainer, base_dir, tmp_path):
    model = ac.transform(load(base_dir, "nf4"), ac.AdaMoLEConfig(dropout=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    common = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                  use_cpu=True, report_to=[], disable_tqdm=True, save_strategy="no")
    if trainer == "hf":
        tf.Trainer(model=model, args=tf.TrainingArguments(**common), train_dataset=LMData()).train()
    else:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        text = [" ".join(f"w{i}" for i in range(j, j + 10)) for j in range(8)]
        SFTTrainer(model=model, args=SFTConfig(**common, bf16=False), processing_class=tokenizer(),
                   train_dataset=Dataset.from_dict({"text": text})).train()
    for n, p in model.named_parameters():
        if ".adapters." in n and ".lora_A" in n:
            assert not torch.equal(p.float(), before[n].float()), n
        elif ".adapters." not in n:
            assert torch.equal(p, before[n]), n


def test_non_hf_quantized_module_names_the_way_out():
    bnb = pytest.importorskip("bitsandbytes")
    net = torch.nn.Sequential(bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=False))
    with pytest.raises(ValueError, match="plan=p"):
        ac.transform(net, ac.AdaMoLEConfig(), example_inputs=(torch.randn(2, 8),))


def test_missing_library_names_the_package(tmp_path, monkeypatch):
    """A quantized model directory, or --quantize, without the library: an error naming the package."""
    import importlib.util
    import json

    from amole_compile.cli.train import load_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    quant, plain = tmp_path / "q", tmp_path / "p"
    for d, extra in ((quant, {"quantization_config": {"quant_method": "bitsandbytes"}}), (plain, {})):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "llama", **extra}))
    with pytest.raises(ValueError, match="quantized with bitsandbytes.*pip install bitsandbytes"):
        load_model(quant)
    with pytest.raises(ValueError, match="--quantize 4bit needs the `bitsandbytes` package: pip install bitsandbytes"):
        load_model(plain, "4bit")


def _repacks_on_cpu() -> bool:
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:  # no bitsandbytes, or one without the CPU repack
        return False
    return bool(has_avx512bf16())


def _four_bit(model):
    return [m for m in model.modules() if getattr(getattr(m, "weight", None), "quant_state", None) is not None]


def test_four_bit_base_keeps_its_stored_format(base_dir, tmp_path):
    """bitsandbytes' lossy CPU repack (absmax to bf16 on the first eval forward) stays off while transformed, so
    an evaluation mid-training changes neither the numbers nor what save_pretrained writes; untransform gives
    the switch back."""
    model = load(base_dir, "nf4")
    layers = _four_bit(model)
    ac.transform(model, ac.AdaMoLEConfig(dropout=0.0))
    x = ids(2, 7)
    with torch.no_grad():
        before = model.train()(input_ids=x).logits
        model.eval()(input_ids=x)
        after = model.train()(input_ids=x).logits
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    fresh = load(base_dir, "nf4").state_dict()  # as quantized on load, never repacked
    absmax = [k for k in fresh if k.endswith("weight.absmax")]
    assert absmax and all(torch.equal(saved[k], fresh[k]) for k in absmax)
    ac.untransform(model)
    assert all(m.support_avx512bf16_for_cpu == _repacks_on_cpu() for m in layers)


@pytest.mark.skipif(not _repacks_on_cpu(), reason="bitsandbytes repacks 4-bit layers only on AVX512-BF16 CPUs")
def test_four_bit_repacked_before_transform_warns(base_dir):
    model = load(base_dir, "nf4")
    with torch.no_grad():
        model.eval()(input_ids=ids(2, 7))  # bitsandbytes repacks here
    with pytest.warns(UserWarning, match="repacked by bitsandbytes"):
        ac.transform(model, ac.AdaMoLEConfig(dropout=0.0))
