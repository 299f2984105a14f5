"""save_pretrained over an earlier save: the folder then holds the new save and the user's own files, whatever
form (sharded or not) each base was saved in, and on a file system without hard links too."""

from __future__ import annotations

import errno
import os

import pytest
import torch
import transformers as tf

import amole_compile as ac
from amole_compile.model.state import adapter_state

from models import build, ids, logits

OURS = ["adapters.safetensors", "amole_config.json"]
HF = ["config.json", "generation_config.json"]


def adapted(seed: int, rank: int = 2):
    """A tiny llama whose base weights and adapters both depend on `seed`."""
    torch.manual_seed(0)
    model = build("llama")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    ac.transform(model, ac.AdaMoLEConfig(num_experts=2, rank=rank))
    with torch.no_grad():
        for p in adapter_state(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def loads_as(folder, model) -> None:
    """from_pretrained + load_adapters of `folder` computes what `model` does."""
    loaded = ac.load_adapters(tf.AutoModelForCausalLM.from_pretrained(folder), folder)
    x = ids(1, 6)
    torch.testing.assert_close(logits(loaded.eval(), x), logits(model.eval(), x), rtol=0, atol=0)


def weights(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("model"))


@pytest.mark.parametrize("first, second", [("sharded", "whole"), ("whole", "sharded"), ("sharded", "sharded")])
def test_an_earlier_base_in_another_form_does_not_stay_behind(tmp_path, first, second):
    """An unsharded `model.safetensors` left beside a new index would be what from_pretrained reads (transformers
    keeps it), an index left beside a new unsharded file misleads; neither stays, nor do the earlier shards."""
    shard = {"sharded": {"max_shard_size": "40KB"}, "whole": {}}
    dest = tmp_path / "out"
    adapted(1).save_pretrained(dest, **shard[first])
    (dest / "tokenizer.json").write_text("{}")
    new = adapted(2, rank=3)
    new.save_pretrained(dest, **shard[second])
    now = weights(dest)
    if second == "whole":
        assert now == ["model.safetensors"]
    else:
        assert "model.safetensors.index.json" in now and "model.safetensors" not in now and len(now) > 2
    assert sorted(os.listdir(dest)) == sorted([*OURS, *HF, "tokenizer.json", *now])
    loads_as(dest, new)


def test_without_hard_links_files_are_placed_one_by_one(tmp_path, monkeypatch):
    """A file system without hard links: the save still replaces the earlier one and keeps the user's files
    (each file renamed into place; no longer one step)."""
    dest = tmp_path / "out"
    adapted(1).save_pretrained(dest, max_shard_size="40KB")
    (dest / "tokenizer.json").write_text("{}")
    (dest / "checkpoint-1").mkdir()
    (dest / "checkpoint-1" / "trainer_state.json").write_text("{}")

    def link(*_a, **_k):
        raise OSError(errno.EPERM, "no hard links here")

    monkeypatch.setattr(os, "link", link)
    new = adapted(2, rank=3)
    new.save_pretrained(dest)
    assert sorted(os.listdir(dest)) == sorted([*OURS, *HF, "model.safetensors", "tokenizer.json", "checkpoint-1"])
    assert (dest / "checkpoint-1" / "trainer_state.json").read_text() == "{}"
    assert sorted(os.listdir(tmp_path)) == ["out"]
    loads_as(dest, new)


def test_saving_into_the_working_directory(tmp_path, monkeypatch):
    """`save_pretrained(".")`, new and over an earlier save: the folder is not swapped away from under the
    process (its files are placed one by one), and the process still works in it."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    adapted(1).save_pretrained(".")
    (work / "tokenizer.json").write_text("{}")
    new = adapted(2, rank=3)
    new.save_pretrained(".")
    assert os.path.samefile(os.getcwd(), work)
    assert sorted(os.listdir(".")) == sorted([*OURS, *HF, "model.safetensors", "tokenizer.json"])
    assert sorted(os.listdir(tmp_path)) == ["work"]
    loads_as(work, new)
