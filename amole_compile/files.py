"""Writing files all or nothing: the one mechanism every writer uses (adapters, statistics, ONNX files, the genai
folder, `.onnx_adapter` files).

    stage    a fresh temporary folder beside the destination (same file system, so renames are atomic)
    write    the caller fills it, under the final names
    place    only when writing succeeded: each file (or the whole folder) is renamed onto its destination
    clean    the temporary folder is removed on the way out, whatever happened

    atomic_write(path, write)   one file
    atomic_files(*paths)        several files of one folder, renamed in the order given (a file that refers to
                                another last, e.g. `m.onnx.data` before `m.onnx`)
    atomic_folder(dest)         a whole folder, replacing an earlier folder of that name (`move_folder`)

An exception while writing leaves the destination as it was and no temporaries behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def _staging(dest: Path) -> Iterator[Path]:
    """A new temporary folder `.<name>.XXXX.tmp` beside `dest`, removed with its contents on exit."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Write several files of one folder all or nothing: yields one temporary path per destination (same file
    name, all in one temporary folder, so files that refer to each other by name stay together); when the block
    succeeds, each is renamed onto its destination in the order given.

        with atomic_files(dest.with_name(dest.name + ".data"), dest) as (data, model):
            ...  # write model (and the data file beside it)
    """
    dests = [Path(p) for p in paths]
    if not dests or len({p.parent for p in dests}) != 1 or len({p.name for p in dests}) != len(dests):
        raise ValueError(f"atomic_files takes distinct file names in one folder, got {[str(p) for p in dests]}")
    with _staging(dests[-1]) as tmp:
        staged = [tmp / p.name for p in dests]
        yield staged
        for src, dst in zip(staged, dests, strict=True):
            os.replace(src, dst)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write a file all or nothing: `write(tmp)` fills a temporary file beside `path`, which is then renamed onto
    it. On any error the temporary file is removed and `path` is left as it was."""
    with atomic_files(path) as (tmp,):
        write(str(tmp))
    return Path(path)


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """Write a folder all or nothing: yields an empty temporary folder; when the block succeeds it replaces
    `dest` whole (an earlier folder there is removed, see `move_folder`)."""
    dest = Path(dest)
    with _staging(dest) as tmp:
        folder = tmp / dest.name
        folder.mkdir()
        yield folder
        move_folder(folder, dest)


def move_folder(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Rename the folder `src` onto `dest`. An earlier `dest` is first moved aside (into a temporary folder
    beside it), put back if the rename fails and removed once it succeeded."""
    src, dest = Path(src), Path(dest)
    with _staging(dest) as aside:
        old = aside / dest.name
        if dest.exists():
            os.replace(dest, old)
        try:
            os.replace(src, dest)
        except BaseException:
            if old.exists():
                os.replace(old, dest)
            raise
    return dest
