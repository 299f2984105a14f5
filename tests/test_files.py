"""files.py: one file, several files and a whole folder written all or nothing; a failure leaves the old content
and no temporaries."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from amole_compile import files


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
    with files.atomic_folder(tmp_path / "out") as tmp:
        assert tmp.name == "out" and tmp.parent.parent == tmp_path and not list(tmp.iterdir())
        (tmp / "a.txt").write_text("a")
    assert _names(tmp_path) == ["out"] and _names(tmp_path / "out") == ["a.txt"]


def test_atomic_folder_replaces_an_earlier_folder_whole(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with files.atomic_folder(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("new")
    assert _names(tmp_path) == ["out"] and _names(tmp_path / "out") == ["new.txt"]


@pytest.mark.parametrize("existing", [True, False])
def test_atomic_folder_failure_keeps_the_old_folder(tmp_path, existing):
    if existing:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(Boom), files.atomic_folder(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("new")
        raise Boom
    assert _names(tmp_path) == (["out"] if existing else [])
    if existing:
        assert _names(tmp_path / "out") == ["old.txt"]


def test_move_folder_puts_the_old_folder_back_when_the_rename_fails(tmp_path, monkeypatch):
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
        files.move_folder(tmp_path / "new", tmp_path / "out")
    assert _names(tmp_path) == ["new", "out"] and _names(tmp_path / "out") == ["old.txt"]
