"""A save is one transaction: `save_adapters` and `save_pretrained` killed at each of their file-system steps
(`faults.kills`) leave a folder that reads as exactly the old save or exactly the new one, and the next save
removes what the killed one left behind. The old and new adapters differ in rank, so a mix could not load."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import amole_compile as ac
from amole_compile.checkpoint.format import read_saved, reread
from amole_compile.model.state import adapter_state

from faults import kills, needs_fork
from models import build, ids, logits

pytestmark = needs_fork
OURS = ["adapters.safetensors", "amole_config.json"]


def adapted(rank: int, seed: int, names=("default",), base=None):
    """A tiny llama with adapters `names` of rank `rank`, their values drawn from `seed`."""
    torch.manual_seed(0)
    model = build("llama") if base is None else base
    for name in names:
        ac.transform(model, ac.AdaMoLEConfig(num_experts=2, rank=rank), adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def same(a, b) -> bool:
    """Deep equality of what a reader saw: dicts, lists, tensors (values and dtype), plain values."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return type(a) is type(b) and a == b


def adapters_seen(folder):
    """What `load_adapters` reads from `folder` (after its manifest checks): active name, configs, targets and
    tensors; None when the folder holds no adapters."""
    if not (folder / "amole_config.json").exists():
        return None
    data, saved, tensors = reread(lambda: read_saved(folder))
    return {"active": data.get("active"), "saved": {n: (c.to_dict(), t) for n, (c, t) in saved.items()},
            "tensors": tensors}


def folder_seen(folder):
    """What from_pretrained and load_adapters read: transformers' config files and weights, and our adapters."""
    seen = {n: json.loads((folder / n).read_text()) for n in ("config.json", "generation_config.json")
            if (folder / n).exists()}
    if (folder / "model.safetensors").exists():
        seen["model.safetensors"] = load_file(folder / "model.safetensors")
    return seen, adapters_seen(folder)


def reference(tmp_path, name, write, pristine=None):
    """The state `write(folder)` leaves in a copy of `pristine` (or a new folder), read back."""
    folder = tmp_path / "ref" / name
    if pristine is not None:
        shutil.copytree(pristine, folder)
    write(folder)
    return folder


def check_each_kill(tmp_path, pristine, write, seen, clean_listing):
    """Kill `write(dest)` at each step; after each kill `dest` reads as the old state or the new, and a complete
    write then leaves exactly `clean_listing` (no leftovers in `dest` or beside it)."""
    dest = tmp_path / "work" / "dest"
    old = seen(pristine) if pristine is not None else seen(tmp_path / "ref" / "empty")
    new = seen(reference(tmp_path, "new", write, pristine))

    def reset() -> None:
        shutil.rmtree(dest.parent, ignore_errors=True)
        dest.parent.mkdir(parents=True)
        if pristine is not None:
            shutil.copytree(pristine, dest)

    outcomes = []
    for k in kills(lambda: write(dest), reset):
        now = seen(dest) if dest.exists() else seen(tmp_path / "ref" / "empty")
        outcomes.append("old" if same(now, old) else "new" if same(now, new) else f"a mix at step {k}")
        write(dest)  # the next write: removes what the killed one left
        assert sorted(os.listdir(dest)) == clean_listing, k
        assert os.listdir(dest.parent) == ["dest"], (k, os.listdir(dest.parent))
        assert same(seen(dest), new), k
    assert not [o for o in outcomes if o not in ("old", "new")], outcomes
    assert "old" in outcomes and "new" in outcomes and len(outcomes) > 8, outcomes
    print(f"{len(outcomes)} kills: {outcomes.count('old')} old, {outcomes.count('new')} new")
    return dest


@pytest.mark.parametrize("case", ["all", "one_of_two"])
def test_save_adapters_killed_at_each_step_reads_old_or_new(case, tmp_path):
    """"all": every adapter replaced (rank 2 -> 3). "one_of_two": `adapter_name="default"` into a folder holding
    default and legal: default is replaced, legal is kept, at every step."""
    (tmp_path / "ref" / "empty").mkdir(parents=True)
    pristine = tmp_path / "old"
    ac.save_adapters(adapted(2, seed=1, names=("default", "legal") if case == "one_of_two" else ("default",)),
                     pristine)
    new_model = adapted(3, seed=2)

    def write(folder):
        ac.save_adapters(new_model, folder, adapter_name="default" if case == "one_of_two" else None)

    dest = check_each_kill(tmp_path, pristine, write, adapters_seen, OURS)
    torch.manual_seed(0)  # the base `adapted` builds
    loaded = ac.load_adapters(build("llama"), dest)
    assert ac.adapter_names(loaded) == (["default", "legal"] if case == "one_of_two" else ["default"])
    x = ids(1, 6)
    ac.set_active_adapter(loaded, "default")
    torch.testing.assert_close(logits(loaded.eval(), x), logits(new_model.eval(), x), rtol=0, atol=0)


USER_FILES = {"tokenizer.json": "{}", "checkpoint-1/trainer_state.json": '{"step": 1}'}  # not the save's own


def with_user_files(folder):
    """What `folder_seen` sees, and the files of USER_FILES that are there (text and mode)."""
    seen = folder_seen(folder)
    user = {n: ((folder / n).read_text(), (folder / n).stat().st_mode) for n in USER_FILES if (folder / n).exists()}
    return seen, user


@pytest.mark.slow
@pytest.mark.parametrize("case", ["new_folder", "earlier_save", "earlier_save_other_base"])
def test_save_pretrained_killed_at_each_step_reads_old_or_new(case, tmp_path):
    """save_pretrained into a new folder (a Trainer checkpoint), over an earlier save of the same base with other
    adapters, and over an earlier save of another base (weights and adapters both differ, so a folder mixing the
    two saves could not pass for either): from_pretrained + load_adapters see the old folder or the new one at
    every step, and the user's own files in the folder (a tokenizer, a checkpoint folder) are there throughout."""
    import transformers as tf

    (tmp_path / "ref" / "empty").mkdir(parents=True)
    pristine = None
    listing = sorted([*OURS, "config.json", "generation_config.json", "model.safetensors"])
    if case != "new_folder":
        pristine = tmp_path / "old"
        adapted(2, seed=1).save_pretrained(pristine)
        for name, text in USER_FILES.items():
            (pristine / name).parent.mkdir(exist_ok=True)
            (pristine / name).write_text(text)
        os.chmod(pristine / "tokenizer.json", 0o600)
        listing = sorted([*listing, "tokenizer.json", "checkpoint-1"])
    base = None
    if case == "earlier_save_other_base":
        torch.manual_seed(0)
        base = build("llama")
        with torch.no_grad():
            for p in base.parameters():
                p.add_(torch.randn_like(p) * 0.01)
    new_model = adapted(3, seed=2, base=base)
    dest = check_each_kill(tmp_path, pristine, new_model.save_pretrained, with_user_files, listing)
    loaded = ac.load_adapters(tf.AutoModelForCausalLM.from_pretrained(dest), dest)
    x = ids(1, 6)
    torch.testing.assert_close(logits(loaded.eval(), x), logits(new_model.eval(), x), rtol=0, atol=0)
    if pristine is not None:
        assert with_user_files(dest)[1] == with_user_files(pristine)[1]
