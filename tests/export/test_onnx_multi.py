"""One ONNX graph, many adapters: `export_onnx(adapters=[...])` stacks named adapters (of different sizes and
methods) behind an `adapter_ids` [batch] input; parity with PyTorch mixed batches, left padding and KV-cache
greedy decoding token for token; OnnxLM checks the ids before running."""

from __future__ import annotations

import types

import pytest
import torch

import amole_compile as ac

from mixed_models import ROWS, adapted, per_row
from models import ids

pytestmark = pytest.mark.slow  # each export takes 10-30 s on 2 cores


@pytest.fixture(scope="module")
def stacked(tmp_path_factory):
    model = adapted(layers=1)  # (stacking is per site; one layer halves the two exports' 2-4 minutes)
    out = tmp_path_factory.mktemp("multi")
    scoring = ac.export_onnx(model, out / "model.onnx", adapters=["a", "b", "c", "d"])
    decoder = ac.export_onnx(model, out / "decoder.onnx", kv_cache=True, adapters=["c", "a", "d", "b"])
    return types.SimpleNamespace(model=model, scoring=ac.OnnxLM(scoring), decoder=ac.OnnxLM(decoder))


def left_padded(rows: int, length: int, seed: int):
    x = ids(rows, length, seed=seed)
    mask = torch.ones_like(x)
    for i in range(rows):
        pad = (2 * i) % 5
        mask[i, :pad] = 0
        x[i, :pad] = 0
    return x, mask


def test_scoring_graph_equals_pytorch_per_row(stacked):
    assert stacked.scoring.adapters == ["a", "b", "c", "d"]
    assert [i.name for i in stacked.scoring.session.get_inputs()][-1] == "adapter_ids"
    x, mask = left_padded(len(ROWS), 9, seed=7)
    want = per_row(stacked.model, x, ROWS, attention_mask=mask)
    got = stacked.scoring.logits(x, mask, adapter_ids=ROWS)
    keep = mask.bool()
    assert (got - want)[keep].abs().max() <= 1e-4
    by_index = stacked.scoring.logits(x, mask, adapter_ids=[["a", "b", "c", "d"].index(r) if r else -1 for r in ROWS])
    assert torch.equal(by_index, got)


def test_kv_cache_greedy_decoding_equals_pytorch_token_for_token(stacked):
    x, mask = left_padded(len(ROWS), 7, seed=8)
    with ac.batch_adapters(stacked.model, ROWS):
        want = stacked.model.generate(x, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert stacked.decoder.adapters == ["c", "a", "d", "b"]  # the graph's own order
    got = stacked.decoder.generate(x, 8, attention_mask=mask, adapter_ids=ROWS)
    assert torch.equal(got, want)
    for name in ("a", None):  # a batch on one adapter (or none) equals the model with that adapter active
        ac.set_active_adapter(stacked.model, name)
        want = stacked.model.generate(x, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(stacked.decoder.generate(x, 5, attention_mask=mask, adapter_ids=[name] * len(ROWS)),
                           want)


def test_onnxlm_checks_adapter_ids_before_running(stacked):
    x = ids(2, 4)
    lm = stacked.scoring
    for adapter_ids, pattern in [
        (["a", "z"], r"unknown adapter 'z' .*stacks \['a', 'b', 'c', 'd'\]"),
        ([0, 4], r"adapter id 4 is out of range"),
        ([-2, 0], r"adapter id -2 is out of range"),
        (["a"], "1 entries for a batch of 2"),
        (None, "pass adapter_ids, one per row"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            lm.logits(x, adapter_ids=adapter_ids)


def test_export_refuses_bad_adapter_lists(tmp_path):
    model = adapted(names=("a", "b"))
    for adapters, pattern in [(["a", "z"], r"unknown adapter 'z'.*\['a', 'b'\]"), (["a", "a"], "twice"),
                              ([], "non-empty list"), ("a", "non-empty list")]:
        with pytest.raises(ValueError, match=pattern):
            ac.export_onnx(model, tmp_path / "m.onnx", adapters=adapters)
    assert list(tmp_path.iterdir()) == []


def test_cli_stacks_the_named_adapters_of_a_saved_model(tmp_path, capsys):
    """`amole-compile export MODEL_DIR ADAPTER_DIR OUT --adapters b,a`: a saved model with several adapters,
    exported as one stacked graph; an unknown name fails in one line and writes nothing."""
    from amole_compile import cli

    model = adapted(names=("a", "b"), layers=1)
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "out" / "multi.onnx"
    out.parent.mkdir()
    assert cli.main(["export", str(tmp_path / "m"), str(tmp_path / "m"), str(out), "--adapters", "b,a"]) == 0
    lm = ac.OnnxLM(out)
    assert lm.adapters == ["b", "a"]
    x = ids(3, 6, seed=9)
    rows = ["a", None, "b"]
    assert (lm.logits(x, adapter_ids=rows) - per_row(model, x, rows)).abs().max() <= 1e-4
    capsys.readouterr()
    assert cli.main(["export", str(tmp_path / "m"), str(tmp_path / "m"), str(tmp_path / "out" / "x.onnx"),
                     "--adapters", "a,zz"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown adapter 'zz'" in err[0], err
    assert sorted(p.name for p in out.parent.iterdir()) == ["multi.onnx"]
