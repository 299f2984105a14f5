"""export_onnx: ORT logits equal PyTorch's on shapes unlike the export example, with left padding and with experts
really masked, for AdaMoLE / MoLE / LoRA, fused QKV (GPT-2), an encoder, the skip masking, and reference-format
checkpoints loaded with load_adapters."""

from __future__ import annotations

import json
from collections import Counter

import onnx
import pytest
import torch

import amole_compile as ac
from amole_compile.cli.load import export_from_dirs

from models import build
from onnx_helpers import SHAPES, adapted, assert_logits_close, assert_routing_varied, batch, reference_logits, sites


def check_parity(model, path, shapes=SHAPES, routed=True) -> None:
    lm = ac.OnnxLM(path)
    for i, (b, s, pad) in enumerate(shapes):
        ids, mask = batch(b, s, seed=10 + i, pad=pad)
        if routed:
            assert_routing_varied(model, ids, mask)
        assert_logits_close(reference_logits(model, ids, mask), lm.logits(ids, mask), mask)


def op_counts(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_adamole_llama_parity(llama_adamole):
    check_parity(llama_adamole.model, llama_adamole.prefill)


def test_graph_interface(llama_adamole):
    m = onnx.load(str(llama_adamole.prefill))
    onnx.checker.check_model(m)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    assert dims == {n: ["batch_size", "sequence_length"] for n in ("input_ids", "attention_mask", "position_ids")}
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in m.graph.input)
    assert [o.name for o in m.graph.output] == ["logits"]
    assert m.opset_import[0].version == 20
    counts = Counter(n.op_type for n in m.graph.node)
    n_sites = len(sites(llama_adamole.model))
    # routing is computed in the graph, per token: per site a gate softmax, a threshold sigmoid and the >= mask
    # applied as Relu(p - tau) == (p - tau) * 1[p - tau >= 0] (the boolean mask output itself is unused, pruned)
    assert counts["Relu"] == n_sites == 8 and counts["Softmax"] >= n_sites and counts["Sigmoid"] >= n_sites
    assert counts["If"] == 0


def test_export_restores_modes(llama_adamole):
    assert llama_adamole.before == llama_adamole.after
    assert any(llama_adamole.before.values())


def test_decoder_interface(llama_adamole):
    m = onnx.load(str(llama_adamole.decoder))
    names = [i.name for i in m.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{t}" for i in range(2) for t in ("key", "value")]
    assert [o.name for o in m.graph.output] == ["logits"] + [f"present.{i}.{t}" for i in range(2)
                                                             for t in ("key", "value")]


@pytest.mark.slow
def test_mole_parity(tmp_path):
    model = adapted("llama", "mole", seed=1, layers=1, top_k=2)
    check_parity(model, ac.export_onnx(model, tmp_path / "mole.onnx"))


@pytest.mark.slow
def test_lora_parity_qwen2(tmp_path):
    model = adapted("qwen2", "lora", seed=2, layers=1)
    path = ac.export_onnx(model, tmp_path / "lora.onnx")
    check_parity(model, path, routed=False)
    ids, mask = batch(1, 5, seed=3)
    base = ac.untransform(model)  # the adapters really change the output
    assert (reference_logits(base, ids, mask) - torch.as_tensor(ac.OnnxLM(path).logits(ids, mask))).abs().max() > 1e-3


def test_gpt2_fused_qkv_parity(gpt2_adamole):
    roles = [t.roles for t in ac.targets(gpt2_adamole.model)]
    assert ("q", "k", "v") in roles  # c_attn is one fused projection with three sites
    check_parity(gpt2_adamole.model, gpt2_adamole.decoder)  # the decoder graph with an empty past


@pytest.mark.slow
def test_skip_masking_parity(tmp_path):
    model = adapted("llama", seed=4, layers=1)
    path = ac.export_onnx(model, tmp_path / "skip.onnx", masking="skip")
    assert op_counts(path)["If"] == len(sites(model)) * 8
    check_parity(model, path)


@pytest.mark.slow
def test_encoder_static_external_data(tmp_path):
    model = adapted("bert", seed=5, layers=1)
    path = ac.export_onnx(model, tmp_path / "bert.onnx", dynamic=False, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert.onnx", "bert.onnx.data"]
    m = onnx.load(str(path), load_external_data=False)
    assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim] == [1, 8]
    ids, mask = batch(1, 8, seed=6)
    assert_routing_varied(model, ids, mask)
    assert_logits_close(reference_logits(model, ids, mask), ac.OnnxLM(path).logits(ids, mask), mask)


def _write_reference_checkpoint(model, path) -> None:
    """Random AdaMoLE adapters for every attention projection, in the reference repo's format."""
    g = torch.Generator().manual_seed(7)
    e, r, tensors = 4, 2, {}
    for name, mod in model.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")):
            p = f"base_model.model.{name}"
            d_in, d_out = mod.in_features, mod.out_features
            for i in range(e):
                tensors[f"{p}.lora_A.{i}.weight"] = torch.randn(r, d_in, generator=g) * 0.2
                tensors[f"{p}.lora_B.{i}.weight"] = torch.randn(d_out, r, generator=g) * 0.05
            tensors[f"{p}.lora_gating.weight"] = torch.randn(e, d_in, generator=g) * 0.3
            tensors[f"{p}.lora_threshold.weight"] = torch.randn(1, d_in, generator=g) * 0.3
            tensors[f"{p}.lora_threshold.bias"] = torch.randn(1, generator=g)
    path.mkdir()
    torch.save(tensors, path / "adapter_model.bin")
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "ADAMOLE", "r": r, "lora_alpha": 8, "lora_dropout": 0.05, "num_experts": e,
        "max_threshold": 0.25, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}))


@pytest.mark.slow
def test_reference_checkpoint_from_dirs(tmp_path):
    base = build("llama", num_hidden_layers=1)
    base.save_pretrained(tmp_path / "model")
    _write_reference_checkpoint(base, tmp_path / "adapter")
    path = export_from_dirs(tmp_path / "model", tmp_path / "adapter", tmp_path / "ref.onnx")
    from amole_compile.cli.load import load_pretrained

    model = ac.load_adapters(load_pretrained(tmp_path / "model"), tmp_path / "adapter").eval()
    check_parity(model, path, shapes=SHAPES[:2])
    ids, mask = batch(1, 9, seed=8)
    assert (reference_logits(base, ids, mask) - reference_logits(model, ids, mask)).abs().max() > 1e-3
