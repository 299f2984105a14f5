"""OnnxLM: greedy generation with the KV cache equals HF generate(do_sample=False) token for token (llama and
GPT-2, batch 1 and batch 2 with left padding, with and without eos), and the inputs it rejects."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import amole_compile as ac

from onnx_helpers import assert_logits_close, assert_routing_varied, batch, reference_logits

NEW = 12


def hf_generate(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama_adamole", "gpt2_adamole"])
def test_generate_matches_hf(arch, request):
    fx = request.getfixturevalue(arch)
    lm = ac.OnnxLM(fx.decoder)
    assert lm.has_cache and lm.num_layers == 2
    for b, pad in ((1, None), (2, {1: 3})):
        ids, mask = batch(b, 7, seed=20 + b, pad=pad)
        assert_routing_varied(fx.model, ids, mask)
        want = hf_generate(fx.model, ids, mask)
        got = lm.generate(ids, NEW, attention_mask=mask)
        assert isinstance(got, torch.Tensor) and torch.equal(got, want), (got, want)


def test_generate_stops_at_eos_like_hf(llama_adamole):
    ids, mask = batch(2, 6, seed=31, pad={0: 2})
    lm = ac.OnnxLM(llama_adamole.decoder)
    free = lm.generate(ids.numpy(), NEW, attention_mask=mask.numpy())
    assert isinstance(free, np.ndarray)
    eos = int(free[1, 6 + 2])  # row 1's third new token: row 1 stops there, row 0 maybe later
    want = hf_generate(llama_adamole.model, ids, mask, eos_token_id=eos)
    got = lm.generate(ids, NEW, eos, attention_mask=mask, pad_token_id=0)
    assert torch.equal(got, want), (got, want)


def test_scoring_graph_generates_without_cache(llama_adamole):
    ids, mask = batch(2, 5, seed=41, pad={0: 1})
    full, scoring = ac.OnnxLM(llama_adamole.decoder), ac.OnnxLM(llama_adamole.prefill)
    assert not scoring.has_cache
    assert torch.equal(scoring.generate(ids, 4, attention_mask=mask), full.generate(ids, 4, attention_mask=mask))


def test_decoder_logits_with_past(llama_adamole):
    """Feed the decoder graph a real past: the last token's logits equal the full forward's."""
    ids, mask = batch(2, 9, seed=51, pad={1: 2})
    assert_routing_varied(llama_adamole.model, ids, mask)
    lm = ac.OnnxLM(llama_adamole.decoder)
    _, past = lm._run(ids[:, :8].numpy(), mask[:, :8].numpy(), None)
    step, _ = lm._run(ids[:, 8:].numpy(), mask.numpy(), past)
    ref = reference_logits(llama_adamole.model, ids, mask)[:, -1:]
    assert_logits_close(ref, step, mask[:, -1:])


def test_rejects_bad_input_ids(llama_adamole):
    lm = ac.OnnxLM(llama_adamole.prefill)
    with pytest.raises(TypeError, match="integer token ids"):
        lm.logits(torch.ones(1, 4))
    with pytest.raises(ValueError, match="rank 2"):
        lm.logits(torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="rank 2"):
        lm.generate(np.ones((1, 2, 3), dtype=np.int64), 2)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        lm.logits(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.generate(torch.ones(1, 4, dtype=torch.long), -1)
    out = lm.logits(torch.ones(1, 4, dtype=torch.int32))  # any integer dtype is fine
    assert out.shape == (1, 4, 128)


@pytest.mark.parametrize("bad", [-1, 128])
def test_token_ids_outside_the_vocabulary_are_refused(llama_adamole, bad):
    """torch's embedding raises for them; the graph's Gather would read a row from the end for -1."""
    lm = ac.OnnxLM(llama_adamole.decoder)
    assert lm.vocab_size == 128
    ids = torch.tensor([[5, bad, 7]])
    with pytest.raises(IndexError):
        llama_adamole.model(input_ids=ids)
    with pytest.raises(ValueError, match=f"token id {bad}, outside the vocabulary .* \\(0..127\\)"):
        lm.logits(ids)
    with pytest.raises(ValueError, match=f"token id {bad}"):
        lm.generate(ids, 2)


def test_rejects_file_without_expected_inputs(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    y = helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, tmp_path / "bad.onnx")
    with pytest.raises(ValueError, match=r"\['attention_mask'\]"):
        ac.OnnxLM(tmp_path / "bad.onnx")
    with pytest.raises(FileNotFoundError):
        ac.OnnxLM(tmp_path / "missing.onnx")
