"""What a save may change: saving one adapter keeps the folder's others, files get the mode the umask gives,
files that are not ours are not replaced unless asked, and what killed writes left behind (of this version or
an earlier one) goes with the next save."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

import amole_compile as ac
from amole_compile.model.state import adapter_state

from models import build

CFG = ac.AdaMoLEConfig(num_experts=2, rank=2)
OURS = ["adapters.safetensors", "amole_config.json"]


def adapted(names=("default",), rank=2, fill=0.1):
    torch.manual_seed(0)
    model = build("llama")
    for name in names:
        ac.transform(model, ac.AdaMoLEConfig(num_experts=2, rank=rank), adapter_name=name)
    with torch.no_grad():
        for p in adapter_state(model).values():
            p.fill_(fill)
    return model


def test_saving_one_adapter_keeps_the_others(tmp_path):
    ac.save_adapters(adapted(("default", "legal")), tmp_path)
    legal = {k: v for k, v in load_file(tmp_path / "adapters.safetensors").items() if ".adapters.legal." in k}
    ac.save_adapters(adapted(rank=3, fill=0.7), tmp_path, adapter_name="default")
    meta = json.loads((tmp_path / "amole_config.json").read_text())
    assert list(meta["adapters"]) == ["default", "legal"] and meta["active"] == "default"
    assert meta["adapters"]["default"]["config"]["rank"] == 3 and meta["adapters"]["legal"]["config"]["rank"] == 2
    tensors = load_file(tmp_path / "adapters.safetensors")
    assert all(torch.equal(tensors[k], v) for k, v in legal.items())
    loaded = ac.load_adapters(build("llama"), tmp_path)
    assert ac.adapter_names(loaded) == ["default", "legal"]
    ac.save_adapters(adapted(rank=3), tmp_path)  # no name: the folder holds exactly the model's adapters
    assert list(json.loads((tmp_path / "amole_config.json").read_text())["adapters"]) == ["default"]
    assert sorted(os.listdir(tmp_path)) == OURS


def test_an_unreadable_folder_is_not_merged_into(tmp_path):
    ac.save_adapters(adapted(("default", "legal")), tmp_path)
    (tmp_path / "adapters.safetensors").write_bytes(b"broken")
    with pytest.raises(ValueError, match="cannot keep the other adapters of .*overwrite=True"):
        ac.save_adapters(adapted(), tmp_path, adapter_name="default")
    assert (tmp_path / "adapters.safetensors").read_bytes() == b"broken"
    ac.save_adapters(adapted(), tmp_path, adapter_name="default", overwrite=True)
    assert list(json.loads((tmp_path / "amole_config.json").read_text())["adapters"]) == ["default"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_get_the_mode_the_umask_gives(umask, tmp_path):
    """safetensors writes 0600 files; ours (and transformers' through save_pretrained) get the mode a plain
    open() gives."""
    model = adapted()
    before = os.umask(umask)
    try:
        ac.save_adapters(model, tmp_path / "a")
        model.save_pretrained(tmp_path / "p")
    finally:
        os.umask(before)
    for file in [*(tmp_path / "a").iterdir(), *(tmp_path / "p").iterdir()]:
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file
    for folder in (tmp_path / "a", tmp_path / "p"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask, folder


def test_files_that_are_not_ours_are_not_replaced(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "amole_config.json").write_text('{"someone": "else"}')
    (tmp_path / "w").mkdir()
    save_file({"embedding": torch.zeros(2)}, tmp_path / "w" / "adapters.safetensors")
    model = adapted()
    for folder, name in (("c", "amole_config.json"), ("w", "adapters.safetensors")):
        with pytest.raises(FileExistsError, match=f"{name} exists and .*overwrite=True"):
            ac.save_adapters(model, tmp_path / folder)
        with pytest.raises(FileExistsError, match=name):
            model.save_pretrained(tmp_path / folder)
    assert (tmp_path / "c" / "amole_config.json").read_text() == '{"someone": "else"}'
    assert list(load_file(tmp_path / "w" / "adapters.safetensors")) == ["embedding"]
    ac.save_adapters(model, tmp_path / "c", overwrite=True)
    assert sorted(os.listdir(tmp_path / "c")) == OURS


def test_the_next_save_removes_what_killed_saves_left(tmp_path):
    """Leftovers of killed writes, this version's (a staging folder, a versioned weights file no config names,
    a save_pretrained staging folder beside the folder) and the previous version's (`.adapters.safetensors.*.tmp`
    staging folders, 30 MB each in the issue), go with the next save; other hidden files stay."""
    dest = tmp_path / "out"
    ac.save_adapters(adapted(), dest)
    left = [dest / ".adapters.safetensors.k3j2h1g0.tmp", dest / ".amole_config.json.ab_cd9xy.tmp",
            tmp_path / ".out.zz99yy88.tmp"]
    for folder in left:
        folder.mkdir()
        (folder / "adapters.safetensors").write_bytes(b"x" * 1000)
    (dest / "adapters.0123456789abcdef.safetensors").write_bytes(b"x")
    (dest / ".keep.tmp").mkdir()
    ac.save_adapters(adapted(fill=0.3), dest)
    assert sorted(os.listdir(dest)) == [".keep.tmp", *OURS]
    assert (tmp_path / ".out.zz99yy88.tmp").exists()  # beside the folder: save_pretrained's, removed by it
    adapted(fill=0.3).save_pretrained(dest)
    assert sorted(os.listdir(tmp_path)) == ["out"]
