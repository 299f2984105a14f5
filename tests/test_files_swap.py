"""files.swap_folder: a staged folder swapped in for an earlier one in one step, the entries it keeps carried over
as second names (same files, modes untouched), what appears meanwhile moved across, and nothing touched where a
file system has no hard links."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from amole_compile import files


def _tree(folder: Path) -> dict[str, str]:
    """relative path -> "dir", "link:<target>", the file's text or "other" (a pipe)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = (f"link:{os.readlink(path)}" if path.is_symlink() else "dir" if path.is_dir()
                    else path.read_text() if path.is_file() else "other")
    return out


def _earlier(tmp_path: Path) -> Path:
    """An earlier save with weights the new one replaces, a shard it drops, a user's files and folders."""
    dest = tmp_path / "dest"
    (dest / "checkpoint-1" / "deep").mkdir(parents=True)
    (dest / "model.safetensors").write_text("old weights")
    (dest / "model-00002-of-00002.safetensors").write_text("old shard")
    (dest / "tokenizer.json").write_text("tok")
    (dest / "secret.txt").write_text("s")
    os.chmod(dest / "secret.txt", 0o600)
    (dest / "checkpoint-1" / "state.json").write_text("state")
    (dest / "checkpoint-1" / "deep" / "opt.pt").write_text("opt")
    os.symlink("tokenizer.json", dest / "alias.json")
    return dest


def _staged(dest: Path) -> Path:
    src = dest.parent / "staged"
    src.mkdir()
    (src / "model.safetensors").write_text("new weights")
    (src / "config.json").write_text("cfg")
    return src


def _keep(name: str) -> bool:
    return name != "model-00002-of-00002.safetensors"


def test_swap_folder_carries_what_it_keeps_as_the_same_files(tmp_path):
    dest = _earlier(tmp_path)
    inodes = {n: (dest / n).stat().st_ino for n in ("tokenizer.json", "secret.txt")}
    deep = (dest / "checkpoint-1" / "deep" / "opt.pt").stat().st_ino
    assert files.swap_folder(_staged(dest), dest, _keep)
    assert _tree(dest) == {
        "alias.json": "link:tokenizer.json", "checkpoint-1": "dir", "checkpoint-1/deep": "dir",
        "checkpoint-1/deep/opt.pt": "opt", "checkpoint-1/state.json": "state", "config.json": "cfg",
        "model.safetensors": "new weights", "secret.txt": "s", "tokenizer.json": "tok"}
    assert {n: (dest / n).stat().st_ino for n in inodes} == inodes  # second names: the very files
    assert (dest / "checkpoint-1" / "deep" / "opt.pt").stat().st_ino == deep
    assert stat.S_IMODE((dest / "secret.txt").stat().st_mode) == 0o600  # a carried file's mode is its own
    assert sorted(os.listdir(tmp_path)) == ["dest"]  # the earlier folder is gone, and the staged name with it


def test_swap_folder_exchanges_in_one_step(tmp_path, monkeypatch):
    """Where the OS can exchange two paths the swap is that one rename: no moment without `dest`."""
    dest = _earlier(tmp_path)
    seen = []
    real = files._exchange

    def exchange(a, b):
        seen.append(_tree(b))  # what a reader sees just before: the earlier folder, whole
        done = real(a, b)
        seen.append(_tree(b))  # and just after: the new one, whole
        return done

    monkeypatch.setattr(files, "_exchange", exchange)
    assert files.swap_folder(_staged(dest), dest, _keep)
    if os.uname().sysname == "Linux":
        assert seen[0]["model.safetensors"] == "old weights" and "config.json" not in seen[0]
        assert seen[1] == _tree(dest)


def test_swap_folder_moves_across_what_appeared_meanwhile(tmp_path, monkeypatch):
    """A file another writer creates in `dest` (or in a carried folder) after the carry is not lost."""
    dest = _earlier(tmp_path)
    real = files._exchange

    def exchange(a, b):
        (b / "late.log").write_text("late")
        (b / "checkpoint-1" / "late.json").write_text("late too")
        return real(a, b)

    monkeypatch.setattr(files, "_exchange", exchange)
    assert files.swap_folder(_staged(dest), dest, _keep)
    assert (dest / "late.log").read_text() == "late"
    assert (dest / "checkpoint-1" / "late.json").read_text() == "late too"
    assert not (dest / "model-00002-of-00002.safetensors").exists()  # dropped on purpose: not moved back


def test_swap_folder_replaced_entries_are_not_merged(tmp_path):
    """A folder the staged one writes anew replaces the earlier folder of that name whole."""
    dest = _earlier(tmp_path)
    src = _staged(dest)
    (src / "checkpoint-1").mkdir()
    (src / "checkpoint-1" / "state.json").write_text("new state")
    assert files.swap_folder(src, dest, _keep)
    assert _tree(dest / "checkpoint-1") == {"state.json": "new state"}


@pytest.mark.parametrize("why", ["no_links", "a_pipe"])
def test_swap_folder_without_second_names_touches_nothing(tmp_path, monkeypatch, why):
    """No hard links on the file system, or an entry that cannot have a second name: False, with `dest` and the
    staged folder as they were (the caller then places files one by one)."""
    dest = _earlier(tmp_path)
    if why == "no_links":
        def link(*_a, **_k):
            raise OSError(errno.EPERM, "no hard links here")

        monkeypatch.setattr(os, "link", link)
    else:
        os.mkfifo(dest / "zz.pipe")
    before = _tree(dest)
    src = _staged(dest)
    staged = _tree(src)
    assert not files.swap_folder(src, dest, _keep)
    assert _tree(dest) == before and _tree(src) == staged


def test_swap_folder_leaves_the_working_directory_in_place(tmp_path, monkeypatch):
    dest = _earlier(tmp_path)
    monkeypatch.chdir(dest / "checkpoint-1")
    before = _tree(dest)
    assert not files.swap_folder(_staged(dest), dest, _keep)
    assert _tree(dest) == before and os.path.samefile(os.getcwd(), dest / "checkpoint-1")
