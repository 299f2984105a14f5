"""Writing files as transactions: the one mechanism every writer uses (adapters, save_pretrained, statistics,
ONNX files, the genai folder, `.onnx_adapter` files). A reader sees the old content or the new, never a mix,
also when the writer is killed at any point; the next write removes what a killed one left behind.

    lock     `folder_lock(folder)`: an exclusive flock on the folder that holds the write's temporaries, held
             for the write (reentrant within a process): writers of one folder take turns, and temporaries
             found under the lock were left by killed writers
    stage    a fresh temporary folder `.<name>.XXXXXXXX.tmp` beside the destination (same file system, so
             renames are atomic); the caller fills it under the final names
    place    only when writing succeeded: each file is flushed to disk, given the mode the umask gives, and
             renamed onto its destination; a folder is swapped in whole
    clean    the temporary folder is removed on the way out, whatever happened; the next write of the same
             destination removes what a killed write left (`clean_leftovers`, `commit_pair`'s versioned files)

    atomic_write(path, write)        one file
    atomic_files(*paths)             several files of one folder, each renamed into place in the order given
    commit_pair(head, body, ...)     a file and the file it names (`m.onnx` naming `m.onnx.data`,
                                     `amole_config.json` naming `adapters.safetensors`): the old pair or the new
    folders.py                       whole folders: staged beside the destination, swapped in in one step

An exception while writing leaves the destination as it was and no temporaries behind. A kill leaves the old
content or the new (folder swaps are atomic where the OS can exchange two paths: Linux renameat2, macOS
renamex_np; elsewhere a kill between two renames can leave the old folder moved aside, restored by nobody).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

_LOCKS: dict[tuple[int, int], list] = {}  # (st_dev, st_ino) -> [RLock, depth, flock fd or None]
_LOCKS_GUARD = threading.Lock()
_LIVE: set[str] = set()  # this process's open staging folders: never leftovers
_STAGED = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")  # tempfile.mkdtemp(prefix=".<name>.", suffix=".tmp")


# ---- lock and leftovers ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[bool]:
    """Hold an exclusive advisory lock (flock) on the existing folder `folder`: writers of the folder, in any
    process, take turns. Reentrant in one thread; other threads of the process wait. Yields whether the lock is
    held (False where the platform or file system has no flock: then nothing may be taken for a leftover)."""
    st = os.stat(folder)
    with _LOCKS_GUARD:
        entry = _LOCKS.setdefault((st.st_dev, st.st_ino), [threading.RLock(), 0, None])
    with entry[0]:
        if entry[1] == 0:
            entry[2] = _flock(folder)
        entry[1] += 1
        try:
            yield entry[2] is not None
        finally:
            entry[1] -= 1
            if entry[1] == 0 and entry[2] is not None:
                os.close(entry[2])  # releases the flock
                entry[2] = None


def _forget_locks() -> None:
    """In a forked child: the parent's locks are the parent's (a write there takes its own, and waits)."""
    global _LOCKS_GUARD
    _LOCKS.clear()
    _LOCKS_GUARD = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks)


def _flock(folder) -> int | None:
    """An open descriptor of `folder` holding LOCK_EX, or None where flock is not available."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        return None
    return fd


def clean_leftovers(folder: str | os.PathLike, *names: str) -> None:
    """Remove the staging folders `.<name>.XXXXXXXX.tmp` of `names` in `folder` that killed writes left behind.
    Call it holding `folder_lock(folder)`."""
    for entry in os.scandir(folder):
        found = _STAGED.fullmatch(entry.name)
        if found and found["name"] in names and entry.path not in _LIVE and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)


def staging_of(name: str, dest: str | os.PathLike) -> bool:
    """Is `name` a staging folder of `dest` (`.<dest name>.XXXXXXXX.tmp`: a live write's, or a killed one's)?"""
    found = _STAGED.fullmatch(name)
    return found is not None and found["name"] == Path(dest).name


@contextlib.contextmanager
def _staging(dest: Path) -> Iterator[Path]:
    """Under the lock of the folder that holds `dest` (leftovers of `dest` removed first): a new temporary folder
    `.<name>.XXXXXXXX.tmp` beside `dest`, removed with its contents on exit. Beside a mount point (a container's
    volume) renames could not reach `dest`: the temporary folder is then made inside it."""
    home = dest if mount_point(dest) else dest.parent
    with folder_lock(home) as locked:
        if locked:
            clean_leftovers(home, dest.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=home))
        _LIVE.add(str(tmp))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            _LIVE.discard(str(tmp))


MOUNTINFO = Path("/proc/self/mountinfo")  # Linux: every mount point of this process, bind mounts included


def mount_point(folder: str | os.PathLike) -> bool:
    """Is `folder` a mount point? No rename crosses one, and none replaces it (a Docker volume's root, a bind
    mount, which `os.path.ismount` misses where both sides are one file system)."""
    if not os.path.isdir(folder) or os.path.islink(folder):
        return False
    if os.path.ismount(folder):
        return True
    try:
        lines = MOUNTINFO.read_text().splitlines()
    except OSError:
        return False
    real = os.path.realpath(folder)
    octal = re.compile(r"\\([0-7]{3})")  # mountinfo writes a space as \040
    return any(len(f) > 4 and octal.sub(lambda m: chr(int(m[1], 8)), f[4]) == real
               for f in (line.split() for line in lines))


# ---- placing files --------------------------------------------------------------------------------------------
def _umask() -> int:
    """The process umask, read without changing it where /proc tells it (changing it races other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _finish(*files: Path) -> None:
    """Give staged files the mode a plain `open` gives (writers such as safetensors make 0600 files) and flush
    them to disk."""
    mode = 0o666 & ~_umask()
    for file in files:
        os.chmod(file, mode)
        _fsync(file)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _place(src: Path, dst: Path) -> None:
    """Rename `src` onto `dst` (atomic: a reader sees the old file or the new)."""
    os.replace(src, dst)


@contextlib.contextmanager
def atomic_files(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Write several files of one folder, each all or nothing: yields one temporary path per destination (same
    file name, all in one temporary folder); when the block succeeds, each is renamed onto its destination in
    the order given. Files that name each other need `commit_pair` instead."""
    dests = [Path(p) for p in paths]
    if not dests or len({p.parent for p in dests}) != 1 or len({p.name for p in dests}) != len(dests):
        raise ValueError(f"atomic_files takes distinct file names in one folder, got {[str(p) for p in dests]}")
    with _staging(dests[-1]) as tmp:
        staged = [tmp / p.name for p in dests]
        yield staged
        _finish(*staged)
        for src, dst in zip(staged, dests, strict=True):
            _place(src, dst)
        _fsync(dests[-1].parent)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write a file all or nothing: `write(tmp)` fills a temporary file beside `path`, which is then renamed onto
    it. On any error the temporary file is removed and `path` is left as it was."""
    with atomic_files(path) as (tmp,):
        write(str(tmp))
    return Path(path)


def versioned(body: Path, token: str | None = None) -> Path:
    """`body` with a token before its last suffix: `adapters.safetensors` -> `adapters.<16 hex>.safetensors`."""
    stem, dot, ext = body.name.rpartition(".")
    token = secrets.token_hex(8) if token is None else token
    return body.with_name(f"{stem}.{token}.{ext}" if dot else f"{body.name}.{token}")


def version_of(name: str, body: str | os.PathLike) -> bool:
    """Is `name` a versioned copy of `body` (`versioned`)?"""
    body = Path(body).name
    stem, dot, ext = body.rpartition(".")
    pattern = (re.escape(stem) + r"\.[0-9a-f]{16}\." + re.escape(ext) if dot else
               re.escape(body) + r"\.[0-9a-f]{16}")
    return re.fullmatch(pattern, name) is not None


def remove_versions(body: Path) -> None:
    """Remove every versioned copy of `body` (`versioned`) in its folder: what `commit_pair` leaves until its end,
    and killed writes leave for good."""
    for entry in os.scandir(body.parent):
        if version_of(entry.name, body) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)


def _second_name(src: Path, dst: Path) -> None:
    """`dst` becomes another name of the file `src` (a hard link; a copy where links are not supported)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        _finish(dst)


def commit_pair(head: str | os.PathLike, body: str | os.PathLike, write: Callable[[Path, str], None],
                rename_body: Callable[[Path, Path, str], None]) -> Path:
    """Write the file `head` and the file `body` it names, so that a reader who follows `head` sees the old pair
    or the new one, whenever the writer is killed. Both end under their own names.

    write(head_tmp, body_name)                  writes `head_tmp` and, beside it, `body_name`, which it names
    rename_body(head, head_tmp, body_name)      writes `head_tmp`: the file `head`, naming `body_name` instead

    The steps: the new body is placed under a fresh versioned name (`versioned`) that no head names; the new
    head, naming it, is renamed onto `head` (the commit); the body gets its own name as a second link, and a
    head naming that replaces the first; then the versioned names go, with those killed writes left."""
    head, body = Path(head), Path(body)
    if head.parent != body.parent or head.name == body.name:
        raise ValueError(f"commit_pair takes two file names in one folder, got {head} and {body}")
    with _staging(head) as tmp:
        fresh = versioned(body)
        write(tmp / head.name, fresh.name)
        _finish(tmp / head.name, tmp / fresh.name)
        _place(tmp / fresh.name, fresh)
        _place(tmp / head.name, head)  # the commit: readers now get the new pair
        _fsync(head.parent)
        rename_body(head, tmp / head.name, body.name)
        _finish(tmp / head.name)
        _second_name(fresh, tmp / body.name)
        _place(tmp / body.name, body)
        _place(tmp / head.name, head)
        _fsync(head.parent)
        remove_versions(body)
    return head
