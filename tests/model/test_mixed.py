"""Mixed batches: each row runs its own adapter (or none) and equals that adapter run alone, eager, under
`generate`, and under torch.compile without graph breaks or recompiles when the mix changes."""

from __future__ import annotations

import copy

import pytest
import torch

import amole_compile as ac
from amole_compile.model.modules import ExpertSet

from mixed_models import CFGS, ROWS, adapted, per_row
from models import build, ids, logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: one fused c_attn, roles differing per adapter
def test_mixed_batch_equals_each_row_alone(arch):
    model = adapted(arch)
    x = ids(len(ROWS), 9, seed=3)
    want = per_row(model, x, ROWS)
    with ac.batch_adapters(model, ROWS):
        got = logits(model, x)
    assert (got - want).abs().max() <= 1e-5
    names = ac.adapter_names(model)
    with ac.batch_adapters(model, [names.index(r) if r else -1 for r in ROWS]):  # ids work like names
        assert torch.equal(logits(model, x), got)
    assert ac.model.mixed.open_rows() is None  # nothing left behind


def test_mixed_batch_under_generate_with_left_padding():
    model = adapted()
    x = ids(len(ROWS), 7, seed=5)
    mask = torch.ones_like(x)
    for i, pad in enumerate([0, 3, 1, 0, 2, 4]):  # left padding, a different length per row
        mask[i, :pad] = 0
        x[i, :pad] = 0
    gen = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with ac.batch_adapters(model, ROWS):
        mixed = model.generate(x, **gen)
    for name in set(ROWS):
        ac.set_active_adapter(model, name)
        alone = model.generate(x, **gen)
        for i, r in enumerate(ROWS):
            if r == name:
                assert torch.equal(mixed[i], alone[i]), (i, r)


def test_beams_repeat_each_rows_adapter():
    model = adapted(names=("a", "b"))
    x = ids(2, 5, seed=1)
    gen = dict(max_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2, pad_token_id=0)
    with ac.batch_adapters(model, ["b", "a"]):
        mixed = model.generate(x, **gen)
    for i, name in enumerate(["b", "a"]):
        ac.set_active_adapter(model, name)
        assert torch.equal(mixed[2 * i:2 * i + 2], model.generate(x[i:i + 1], **gen))


def test_compiled_mixed_batch_has_no_graph_break_and_no_recompile_when_the_mix_changes():
    from torch._dynamo.testing import CompileCounterWithBackend

    model = adapted()
    x = ids(len(ROWS), 8, seed=2)
    mixes = [ROWS, ["d", "d", "a", None, "b", "c"], [None] * 6, ["c"] * 6]
    wants = [per_row(model, x, rows) for rows in mixes]  # (switching the active adapter would recompile)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for rows, want in zip(mixes, wants, strict=True):
        with ac.batch_adapters(model, rows), torch.no_grad():
            got = compiled(input_ids=x).logits
        assert (got - want).abs().max() <= 1e-5, rows
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for {len(mixes)} mixes"


@pytest.mark.slow
def test_mixed_batch_under_inductor():
    model = adapted()
    x = ids(len(ROWS), 8, seed=2)
    want = per_row(model, x, ROWS)
    compiled = torch.compile(model, fullgraph=True)
    with ac.batch_adapters(model, ROWS), torch.no_grad():
        got = compiled(input_ids=x).logits
    # inductor fuses and reorders the fp32 reductions (seen: 1.07e-5 off); a row on the wrong adapter is far off
    torch.testing.assert_close(got, want, rtol=1e-4, atol=3e-5)


def test_training_on_a_mixed_batch_reaches_the_rows_adapters_only():
    model = adapted(names=("a", "b", "c"))
    for n, p in model.named_parameters():
        p.requires_grad_(".adapters." in n)
    model.train()
    x = ids(4, 6, seed=4)
    with ac.batch_adapters(model, ["a", "b", "a", None]):
        out = model(input_ids=x, labels=x)
    out.loss.backward()
    for n, p in model.named_parameters():
        if ".adapters.c." in n:
            assert p.grad is None or not p.grad.any(), n
        elif ".adapters." in n and n.endswith("lora_A"):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    sites = {n: m for n, m in model.named_modules() if isinstance(m, ExpertSet)}
    assert all(m.aux is not None for n, m in sites.items() if ".adapters.a." in n or ".adapters.b." in n)
    assert out.aux_loss > 0


def test_statistics_count_each_adapters_own_tokens():
    model = adapted(names=("a", "b"))
    ac.reset_expert_stats(model)
    with ac.batch_adapters(model, ["a", "b", "a", None]), torch.no_grad():
        model(input_ids=ids(4, 5))
    assert {s.tokens for s in ac.expert_stats(model, "a").sites} == {10}
    assert {s.tokens for s in ac.expert_stats(model, "b").sites} == {5}


def test_bad_rows_are_refused():
    model = adapted(names=("a", "b"))
    for rows, pattern in [
        (["a", "z"], r"unknown adapter 'z'.*\['a', 'b'\]"),
        ([0, 2], r"adapter id 2 is out of range.*\['a', 'b'\]"),
        ([-2], r"adapter id -2 is out of range"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            with ac.batch_adapters(model, rows):
                pass
    with pytest.raises(TypeError, match="list of adapter names"):
        with ac.batch_adapters(model, "a"):
            pass
    with pytest.raises(ValueError, match="was given 3 rows' adapters, but a projection sees a batch of 4"):
        with ac.batch_adapters(model, ["a", "b", "a"]):
            model(input_ids=ids(4, 5))
    assert ac.model.mixed.open_rows() is None


def test_adapters_of_different_dtypes_are_refused_by_name():
    model = build("llama")
    ac.transform(model, CFGS["a"], adapter_name="a")
    ac.transform(model, ac.AdaMoLEConfig(adapter_dtype="bfloat16"), adapter_name="bf16")
    with pytest.raises(ValueError, match=r"different dtypes.*'a' torch.float32, 'bf16' torch.bfloat16"):
        with ac.batch_adapters(model, ["a", "bf16"]):
            pass
    assert ac.model.mixed.open_rows() is None


def test_graph_modules_refuse_mixed_batches():
    base = build("llama")
    x = ids(2, 8)
    ep = torch.export.export(copy.deepcopy(base), (x,), {"use_cache": False}, strict=False)
    gm = ac.transform(ep, CFGS["a"])
    with pytest.raises(ValueError, match="mixed batches need an nn.Module"):
        with ac.batch_adapters(gm, ["default", None]):
            pass
