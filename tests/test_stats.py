"""Expert statistics: counts match the routing masks, accumulate until reset, skip export tracing, plot."""

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

    def record(self, scores, mask):
        seen[names[id(self)]] = mask.clone()
        orig(self, scores, mask)

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
