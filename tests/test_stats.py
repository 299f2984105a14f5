"""Expert statistics: counts match the routing masks, accumulate until reset, skip export tracing, count the
passes and tokens they say they count (eval-mode forwards, real tokens), plot."""

from __future__ import annotations

import sys

import pytest
import torch

import amole_compile as ac

from models import build, ids


def adapted(method="adamole", **kw):
    model = build("llama")
    ac.transform(model, ac.AdaMoLEConfig(method=method, dropout=0.0, **kw))
    return model


def masks_by_site(model, x, monkeypatch):
    """Run a forward recording every site's routing mask as the op hands it to ExpertSet.record."""
    from amole_compile.model.modules import ExpertSet

    names = {id(m): n for n, m in model.named_modules() if isinstance(m, ExpertSet)}
    seen, orig = {}, ExpertSet.record

    def record(self, scores, mask, *a, **k):
        seen[names[id(self)]] = mask.clone()
        orig(self, scores, mask, *a, **k)

    monkeypatch.setattr(ExpertSet, "record", record)
    model(input_ids=x)
    monkeypatch.undo()
    return seen


def test_counts_match_the_masks(monkeypatch):
    model = adapted()
    x = ids(3, 11)
    masks = masks_by_site(model, x, monkeypatch)
    stats = ac.expert_stats(model)
    assert len(stats.sites) == 8 and len(masks) == 8
    for s in stats.sites:
        mask = masks[f"{s.module}.adapters.default.{s.role}"]
        assert s.tokens == 33
        assert s.mean_active == pytest.approx(mask.sum(-1).double().mean().item(), abs=1e-12)
        assert s.selection_fraction == pytest.approx(mask.double().mean(0).tolist(), abs=1e-12)
        hist = torch.bincount(mask.sum(-1), minlength=9).double() / 33
        assert s.active_histogram == pytest.approx(hist.tolist(), abs=1e-12)
        assert sum(s.active_histogram) == pytest.approx(1.0)
        assert s.layer == int(s.module.split(".")[2])
    partly = [s for s in stats.sites if 0 < s.mean_active < 8]
    assert partly, "the test inputs should mask some experts"


def test_accumulates_until_reset():
    model = adapted()
    model(input_ids=ids(2, 8))
    model(input_ids=ids(1, 5, seed=3))
    assert {s.tokens for s in ac.expert_stats(model).sites} == {21}
    ac.reset_expert_stats(model)
    assert {s.tokens for s in ac.expert_stats(model).sites} == {0}
    assert ac.expert_stats(model).mean_active == 0.0


def test_lora_and_mole_counts():
    lora = adapted("lora")
    lora(input_ids=ids())
    assert {s.mean_active for s in ac.expert_stats(lora).sites} == {1.0}
    mole = adapted("mole", num_experts=4, top_k=2)
    mole(input_ids=ids())
    stats = ac.expert_stats(mole)
    assert {s.mean_active for s in stats.sites} == {2.0}
    assert all(sum(s.selection_fraction) == pytest.approx(2.0) for s in stats.sites)


def test_export_tracing_does_not_count():
    model = adapted()
    torch.export.export(model, (), {"input_ids": ids(), "use_cache": False}, strict=False)
    assert {s.tokens for s in ac.expert_stats(model).sites} == {0}


def test_save_table_and_plot(tmp_path):
    model = adapted()
    model(input_ids=ids())
    stats = ac.expert_stats(model)
    saved = stats.save(tmp_path / "stats.json")
    assert '"mean_active"' in saved.read_text()
    assert "overall mean active experts" in stats.table()
    png = ac.plot_expert_stats(stats, tmp_path / "experts.png", title="tiny llama")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experts.png", "stats.json"]


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    model = adapted()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"amole-compile\[plot\]"):
        ac.plot_expert_stats(ac.expert_stats(model), tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_counter_lengths_stay_static_for_dynamo():
    """Under torch.compile(dynamic=True) a dynamic counter length could share a symbol with an equal sequence
    length and specialise the graph to it; the counters are marked static, also after .to()."""
    model = adapted().to(torch.float64)
    sites = [m for m in model.modules() if hasattr(m, "stat_selected")]
    assert sites
    for site in sites:
        for buf in (site.stat_selected, site.stat_active):
            assert getattr(buf, "_dynamo_static_indices", set()) == {0}


def test_only_the_real_tokens_are_counted(monkeypatch):
    """A padded batch (attention_mask): the padding is not counted, and each real token's routing is counted as
    in the unpadded rows, also with left padding and a KV cache (generate)."""
    model = adapted()
    x = ids(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0  # right padding: 5 + 8 = 13 real tokens
    with torch.no_grad():
        model(input_ids=x, attention_mask=mask)
    assert {s.tokens for s in ac.expert_stats(model).sites} == {13}
    ac.reset_expert_stats(model)
    with torch.no_grad():  # the same tokens unpadded: the same routing, so the same counts
        model(input_ids=x[:1, :5])
        model(input_ids=x[1:])
    want = ac.expert_stats(model)
    ac.reset_expert_stats(model)
    with torch.no_grad():
        model(input_ids=x, attention_mask=mask)
    got = ac.expert_stats(model)
    for a, b in zip(got.sites, want.sites, strict=True):
        assert a.tokens == b.tokens == 13
        assert a.active_histogram == pytest.approx(b.active_histogram, abs=1e-6)
        assert a.selection_fraction == pytest.approx(b.selection_fraction, abs=1e-6)
    ac.reset_expert_stats(model)
    left = torch.ones(2, 6, dtype=torch.long)
    left[1, :2] = 0  # left padding, then 4 generated tokens: 6 + 4 prompt tokens, then 2 x 3 decoded
    model.generate(x[:, :6], attention_mask=left, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert {s.tokens for s in ac.expert_stats(model).sites} == {10 + 2 * 3}


def test_the_passes_counted_are_the_ones_stated():
    """Eval-mode forwards by default; training forwards only with passes='train' (or 'all'); the table, the
    JSON and the plot say which."""
    model = adapted()
    model.train()
    model(input_ids=ids(2, 8))
    stats = ac.expert_stats(model)
    assert {s.tokens for s in stats.sites} == {0} and stats.passes == "eval"
    assert "counted: eval-mode forwards" in stats.table() and "passes='train'" in stats.table()
    ac.reset_expert_stats(model, passes="train")
    model(input_ids=ids(2, 8))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids(1, 8))
    stats = ac.expert_stats(model).over("two training steps")
    assert {s.tokens for s in stats.sites} == {16} and stats.passes == "train"
    assert stats.to_dict()["scope"]["window"] == "two training steps"
    assert stats.table().splitlines()[0].startswith("counted: training-mode forwards (dropout on)")
    ac.reset_expert_stats(model, passes="all")
    with torch.no_grad():
        model(input_ids=ids(1, 8))
    assert {s.tokens for s in ac.expert_stats(model).sites} == {8}
    with pytest.raises(ValueError, match="passes must be one of"):
        ac.reset_expert_stats(model, passes="both")


def test_mixed_batch_counts_skip_padding():
    """batch_adapters rows: each adapter counts its own rows' real tokens."""
    model = adapted()
    ac.transform(model, ac.AdaMoLEConfig(dropout=0.0), adapter_name="b")
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    ac.reset_expert_stats(model)
    with torch.no_grad(), ac.batch_adapters(model, ["default", "b"]):
        model(input_ids=ids(2, 6), attention_mask=mask)
    assert {s.tokens for s in ac.expert_stats(model, "default").sites} == {6}
    assert {s.tokens for s in ac.expert_stats(model, "b").sites} == {4}
