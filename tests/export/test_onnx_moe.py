"""ONNX export of an adapted model whose base has MoE feed-forwards (Mixtral): transformers runs its experts on
its custom op `transformers::grouped_mm_fallback`, which had no ONNX function, so no such model exported, adapted
or not. `export/_moe.py` translates it; the scoring graph equals PyTorch at several shapes (the routing differs
per token), and the KV-cache graph decodes as HF generate does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

import amole_compile as ac
from amole_compile.export._moe import moe_translations

from models import VOCAB


@pytest.fixture(scope="module")
def mixtral():
    cfg = tf.MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(cfg).eval()
    ac.transform(model, ac.AdaMoLEConfig(num_experts=2, rank=2, dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def test_the_grouped_matmul_is_in_the_table(mixtral):
    """(registered by transformers once its MoE integration is imported, as building the model does)"""
    assert set(map(str, moe_translations())) == {"transformers.grouped_mm_fallback.default", "aten._grouped_mm.default"}


def test_scoring_graph_matches(mixtral, tmp_path):
    lm = ac.OnnxLM(ac.export_onnx(mixtral, tmp_path / "moe.onnx"))
    for seed, shape in enumerate(((2, 6), (3, 11), (1, 1))):
        ids = torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(seed))
        mask = torch.ones_like(ids)
        if shape[0] > 1:
            mask[1, :1] = 0  # left padding: compared where real
        with torch.no_grad():
            want = mixtral(input_ids=ids, attention_mask=mask,
                           position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        got = torch.as_tensor(lm.logits(ids.numpy(), mask.numpy()))
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)


def test_kv_cache_graph_decodes_as_generate(mixtral, tmp_path):
    lm = ac.OnnxLM(ac.export_onnx(mixtral, tmp_path / "moe_kv.onnx", kv_cache=True))
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = mixtral.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = lm.generate(ids.numpy(), max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(got), want.numpy())


def test_bf16_experts_export_through_aten_grouped_mm(tmp_path, monkeypatch):
    """bf16 experts run on `aten._grouped_mm` with offsets, which torch.onnx's own translation refuses. Ours
    exports them (the same `grouped_mm` as above, whose numbers that test checks; onnxruntime's CPU provider
    has no bf16 kernels to run this graph, for any bf16 model)."""
    import onnx

    from amole_compile.export import _moe

    calls = []
    real = _moe.grouped_mm
    monkeypatch.setattr(_moe, "grouped_mm", lambda *a: calls.append(1) or real(*a))
    cfg = tf.MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(cfg).to(torch.bfloat16).eval()
    ac.transform(model, ac.AdaMoLEConfig(num_experts=2, rank=2, dropout=0.0))
    graph = onnx.load(str(ac.export_onnx(model, tmp_path / "moe_bf16.onnx")))
    assert len(calls) == 2  # gate_up and down of the one layer's experts
    assert sum(n.op_type == "GatherElements" for n in graph.graph.node) >= 2


def test_other_grouped_mm_forms_are_refused_by_name():
    from amole_compile.export._moe import aten_grouped_mm

    class V:  # an ir.Value stand-in: shape and dtype
        def __init__(self, rank):
            self.shape, self.dtype = (None,) * rank, None

    with pytest.raises(NotImplementedError, match=r"only in the MoE form .* got ranks \(3, 3\), offsets False"):
        aten_grouped_mm(V(3), V(3))
