"""files.py: one file, several files and a whole folder written all or nothing; a failure leaves the old content
and no temporaries."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from amole_compile import files, folders


class Boom(Exception):
    pass


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_writes_and_returns_the_path(tmp_path):
    out = files.atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("new"))
    assert out == tmp_path / "a.txt" and out.read_text() == "new"
    assert _names(tmp_path) == ["a.txt"]


@pytest.mark.parametrize("existing", [True, False])
def test_atomic_write_failure_keeps_the_old_file(tmp_path, existing):
    if existing:
        (tmp_path / "a.txt").write_text("old")

    def write(tmp):
        Path(tmp).write_text("half")
        raise Boom

    with pytest.raises(Boom):
        files.atomic_write(tmp_path / "a.txt", write)
    assert _names(tmp_path) == (["a.txt"] if existing else [])
    if existing:
        assert (tmp_path / "a.txt").read_text() == "old"


def test_atomic_files_renames_in_order(tmp_path, monkeypatch):
    """Both files are staged together under their own names and renamed in the order given (data file first)."""
    moved, replace = [], os.replace
    monkeypatch.setattr(files.os, "replace", lambda src, dst: (moved.append(Path(dst).name), replace(src, dst)))
    with files.atomic_files(tmp_path / "m.onnx.data", tmp_path / "m.onnx") as (data, model):
        assert data.parent == model.parent != tmp_path and (data.name, model.name) == ("m.onnx.data", "m.onnx")
        data.write_text("weights")
        model.write_text("graph")
    assert moved == ["m.onnx.data", "m.onnx"]
    assert _names(tmp_path) == ["m.onnx", "m.onnx.data"]


def test_atomic_files_failure_keeps_the_old_files(tmp_path):
    (tmp_path / "m.onnx").write_text("old")
    with pytest.raises(Boom), files.atomic_files(tmp_path / "m.onnx.data", tmp_path / "m.onnx") as (data, model):
        data.write_text("weights")
        model.write_text("graph")
        raise Boom
    assert _names(tmp_path) == ["m.onnx"] and (tmp_path / "m.onnx").read_text() == "old"


def test_atomic_files_takes_distinct_names_in_one_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    for paths in [(), (tmp_path / "a", tmp_path / "sub" / "b"), (tmp_path / "a", tmp_path / "a")]:
        with pytest.raises(ValueError, match="distinct file names in one folder"), files.atomic_files(*paths):
            pass
    assert _names(tmp_path) == ["sub"]


def test_atomic_folder_writes_a_new_folder(tmp_path):
    with folders.atomic_folder(tmp_path / "out") as tmp:
        assert tmp.name == "out" and tmp.parent.parent == tmp_path and not list(tmp.iterdir())
        (tmp / "a.txt").write_text("a")
    assert _names(tmp_path) == ["out"] and _names(tmp_path / "out") == ["a.txt"]


def test_atomic_folder_replaces_an_earlier_folder_whole(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with folders.atomic_folder(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("new")
    assert _names(tmp_path) == ["out"] and _names(tmp_path / "out") == ["new.txt"]


@pytest.mark.parametrize("existing", [True, False])
def test_atomic_folder_failure_keeps_the_old_folder(tmp_path, existing):
    if existing:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(Boom), folders.atomic_folder(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("new")
        raise Boom
    assert _names(tmp_path) == (["out"] if existing else [])
    if existing:
        assert _names(tmp_path / "out") == ["old.txt"]


def test_move_folder_puts_the_old_folder_back_when_the_rename_fails(tmp_path, monkeypatch):
    """Where the OS cannot exchange two paths, the old folder is moved aside first and put back on failure."""
    monkeypatch.setattr(folders, "_exchange", lambda a, b: False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    (tmp_path / "new").mkdir()
    replace = os.replace

    def failing(src, dst):
        if Path(src).name == "new":
            raise OSError("rename failed")
        replace(src, dst)

    monkeypatch.setattr(files.os, "replace", failing)
    with pytest.raises(OSError, match="rename failed"):
        folders.move_folder(tmp_path / "new", tmp_path / "out")
    assert _names(tmp_path) == ["new", "out"] and _names(tmp_path / "out") == ["old.txt"]


# ---- transactions: locks, leftovers, pairs, modes ---------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a second process")
def test_folder_lock_excludes_other_processes_and_is_reentrant(tmp_path):
    import fcntl

    def other_process_can_lock() -> bool:
        pid = os.fork()
        if pid == 0:
            fd = os.open(tmp_path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os._exit(1)
            os._exit(0)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0

    with files.folder_lock(tmp_path) as held:
        assert held and not other_process_can_lock()
        with files.folder_lock(tmp_path) as again:  # the same thread: no deadlock
            assert again
        assert not other_process_can_lock()
    assert other_process_can_lock()


def test_clean_leftovers_removes_only_staging_folders_of_the_names(tmp_path):
    for name in [".a.txt.abcd_123.tmp", ".b.txt.abcd_123.tmp", ".a.txt.tmp", "a.txt.abcd_123.tmp"]:
        (tmp_path / name).mkdir()
    (tmp_path / ".a.txt.zzzzzzzz.tmp").write_text("a file, not a staging folder")
    files.clean_leftovers(tmp_path, "a.txt")
    assert _names(tmp_path) == [".a.txt.tmp", ".a.txt.zzzzzzzz.tmp", ".b.txt.abcd_123.tmp", "a.txt.abcd_123.tmp"]


def test_the_next_write_removes_staging_folders_of_killed_writes(tmp_path):
    (tmp_path / ".a.txt.k1lled00.tmp").mkdir()
    (tmp_path / ".a.txt.k1lled00.tmp" / "a.txt").write_text("half")
    files.atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("new"))
    assert _names(tmp_path) == ["a.txt"]


def _pair(tmp_path, head_text: str, body_text: str, fail: bool = False):
    def write(head: Path, body_name: str) -> None:
        (head.parent / body_name).write_text(body_text)
        if fail:
            raise Boom
        head.write_text(f"{head_text} -> {body_name}")

    def rename_body(old: Path, head: Path, body_name: str) -> None:
        head.write_text(old.read_text().split(" -> ")[0] + f" -> {body_name}")

    return files.commit_pair(tmp_path / "h", tmp_path / "h.data", write, rename_body)


def test_commit_pair_ends_with_both_under_their_own_names(tmp_path):
    """The head names the body under its own name at the end; the versioned names (this write's and those of
    killed writes) are gone."""
    (tmp_path / "h.0123456789abcdef.data").write_text("a killed write's")
    _pair(tmp_path, "old", "old body")
    _pair(tmp_path, "new", "new body")
    assert _names(tmp_path) == ["h", "h.data"]
    assert (tmp_path / "h").read_text() == "new -> h.data" and (tmp_path / "h.data").read_text() == "new body"
    with pytest.raises(Boom):
        _pair(tmp_path, "never", "never", fail=True)
    assert _names(tmp_path) == ["h", "h.data"] and (tmp_path / "h.data").read_text() == "new body"


def test_commit_pair_commits_the_head_before_the_body_gets_its_name(tmp_path, monkeypatch):
    """The order a reader depends on: the new body under a versioned name, the head naming it (the commit),
    then the body's own name, the head naming that, the versioned name removed."""
    _pair(tmp_path, "old", "old body")
    events, replace = [], os.replace
    monkeypatch.setattr(files.os, "replace", lambda s, d: (events.append(Path(d).name), replace(s, d)))
    _pair(tmp_path, "new", "new body")
    assert [e.replace(e.split(".")[1], "<v>") if e.count(".") == 2 else e for e in events] == [
        "h.<v>.data", "h", "h.data", "h"]


def test_versioned_names():
    assert files.versioned(Path("d/adapters.safetensors"), "0" * 16) == Path(f"d/adapters.{'0' * 16}.safetensors")
    assert files.versioned(Path("d/m.onnx.data"), "1" * 16) == Path(f"d/m.onnx.{'1' * 16}.data")


def test_move_folder_exchanges_in_one_step(tmp_path, monkeypatch):
    """Where the OS can exchange two paths the earlier folder is never missing: no rename moves it aside."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "new.txt").write_text("new")
    monkeypatch.setattr(files.os, "replace", lambda s, d: pytest.fail(f"renamed {s} -> {d}"))
    if not folders._exchange(tmp_path / "new", tmp_path / "new"):
        pytest.skip("this OS / file system cannot exchange two paths")
    folders.move_folder(tmp_path / "new", tmp_path / "out")
    assert _names(tmp_path) == ["out"] and _names(tmp_path / "out") == ["new.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_get_the_mode_the_umask_gives(tmp_path, umask):
    import stat

    from safetensors.torch import save_file

    before = os.umask(umask)
    try:
        files.atomic_write(tmp_path / "a.safetensors", lambda tmp: save_file({}, tmp))  # safetensors makes 0600
        with folders.atomic_folder(tmp_path / "out") as out:
            save_file({}, str(out / "b.safetensors"))
    finally:
        os.umask(before)
    for file in (tmp_path / "a.safetensors", tmp_path / "out" / "b.safetensors"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
