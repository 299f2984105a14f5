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
    staged_folder(dest)              a temporary folder beside `dest`, for `move_files` / `move_folder`
    move_files(src, dest)            the files of a staged folder into an existing folder, one rename each
    atomic_folder(dest)              a whole folder, swapped in for an earlier folder of that name
    swap_folder(src, dest, keep)     a staged folder swapped in for an earlier one, the entries it keeps carried

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


@contextlib.contextmanager
def _staging(dest: Path) -> Iterator[Path]:
    """Under the lock of `dest`'s folder (leftovers of `dest` removed first): a new temporary folder
    `.<name>.XXXXXXXX.tmp` beside `dest`, removed with its contents on exit."""
    with folder_lock(dest.parent) as locked:
        if locked:
            clean_leftovers(dest.parent, dest.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        _LIVE.add(str(tmp))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            _LIVE.discard(str(tmp))


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


def remove_versions(body: Path) -> None:
    """Remove every versioned copy of `body` (`versioned`) in its folder: what `commit_pair` leaves until its end,
    and killed writes leave for good."""
    stem, dot, ext = body.name.rpartition(".")
    pattern = re.compile(re.escape(stem) + r"\.[0-9a-f]{16}\." + re.escape(ext) if dot else
                         re.escape(body.name) + r"\.[0-9a-f]{16}")
    for entry in os.scandir(body.parent):
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
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


# ---- folders --------------------------------------------------------------------------------------------------
def move_files(src: str | os.PathLike, dest: str | os.PathLike, last: Callable[[str], bool] = lambda n: False
               ) -> list[str]:
    """Rename every entry of folder `src` into the existing folder `dest` (files one atomic rename each, replacing
    files of the same name; folders swapped in whole), those `last(name)` selects after the others. Returns the
    names moved."""
    src, dest = Path(src), Path(dest)
    names = sorted(os.listdir(src), key=lambda n: (last(n), n))
    _finish(*[src / n for n in names if (src / n).is_file()])
    for name in names:
        if (src / name).is_dir():
            move_folder(src / name, dest / name)
        else:
            _place(src / name, dest / name)
    _fsync(dest)
    return names


@contextlib.contextmanager
def staged_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """Under the lock of `dest`'s parent: an empty temporary folder named like `dest` (in `.<name>.XXXXXXXX.tmp`
    beside it), removed on exit; the caller places its contents (`move_files`, `move_folder`)."""
    dest = Path(dest)
    with _staging(dest) as tmp:
        folder = tmp / dest.name
        folder.mkdir()
        yield folder


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """Write a folder all or nothing: yields an empty temporary folder; when the block succeeds it replaces
    `dest` whole (`move_folder`)."""
    with staged_folder(dest) as folder:
        yield folder
        move_folder(folder, dest)


def move_folder(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Rename the folder `src` (its files finished first, as `atomic_files` does) onto `dest`. An earlier `dest`
    is exchanged with `src` in one step where the OS can (`_exchange`), then removed; elsewhere it is first moved
    aside (into a temporary folder beside it), put back if the rename fails and removed once it succeeded."""
    src, dest = Path(src), Path(dest)
    _finish(*[p for p in src.rglob("*") if p.is_file() and not p.is_symlink()])
    if not dest.exists():
        os.replace(src, dest)
    elif _exchange(src, dest):
        shutil.rmtree(src, ignore_errors=True)  # `src` now names the earlier folder
    else:
        _move_aside(src, dest)
    _fsync(dest.parent)
    return dest


def swap_folder(src: str | os.PathLike, dest: str | os.PathLike, keep: Callable[[str], bool]) -> bool:
    """Make the staged folder `src` the existing folder `dest` in one step, carrying over the entries of `dest`
    that `src` lacks and `keep(name)` selects: their files as second names (hard links: the same files, modes
    untouched), folders rebuilt likewise, symbolic links as links. Then the folders are exchanged (`_exchange`;
    elsewhere `move_folder`'s move aside), and what appeared in `dest` meanwhile moves across before the earlier
    folder goes. False, with `dest` untouched and `src` as it was, where the file system has no hard links,
    `dest` holds something else than files, folders and links, or the process works in `dest`: the caller then
    places the files one by one."""
    src, dest = Path(src), Path(dest)
    if _holds_cwd(dest):  # exchanged, the process would work in the removed earlier folder
        return False
    _finish(*[p for p in src.rglob("*") if p.is_file() and not p.is_symlink()])  # before any second name is in
    names = [n for n in sorted(os.listdir(dest)) if keep(n) and not os.path.lexists(src / n)]
    carried: list[str] = []
    try:
        for name in names:
            carried.append(name)
            _carry(dest / name, src / name)
    except _NoLinks:
        for name in carried:
            _unlink_tree(src / name)
        return False
    if not _exchange(src, dest):
        _move_aside(src, dest)
        return True
    _fsync(dest.parent)
    _settle(src, dest, set(carried), {n for n in os.listdir(src) if not keep(n)})  # `src`: the earlier folder
    return True


def _holds_cwd(folder: Path) -> bool:
    """Is the process's working directory `folder` or inside it?"""
    cwd, real = os.getcwd(), os.path.realpath(folder)
    return cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep)


class _NoLinks(Exception):
    """An entry cannot be carried over as a second name."""


def _carry(old: Path, new: Path) -> None:
    """`new` becomes another name of `old`: a hard link of a file, a folder of such links, a copy of a link."""
    if old.is_symlink():
        os.symlink(os.readlink(old), new)
    elif old.is_dir():
        os.mkdir(new)
        shutil.copymode(old, new)
        for name in sorted(os.listdir(old)):
            _carry(old / name, new / name)
    elif old.is_file():
        try:
            os.link(old, new)
        except OSError as exc:
            raise _NoLinks(str(old)) from exc
    else:  # a socket, a pipe, a device: no second name for these
        raise _NoLinks(str(old))


def _unlink_tree(path: Path) -> None:
    """Remove `path` (a carried second name; the first names stay)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def _settle(old: Path, new: Path, carried: set[str] | None, dropped: set[str] = frozenset()) -> None:
    """After the exchange: entries of the earlier folder `old` that the new folder `new` lacks and that were not
    `dropped` on purpose appeared while the save ran, and move across, also inside the `carried` folders (None:
    all of `old` was carried); then `old` goes."""
    for name in sorted(os.listdir(old)):
        there = new / name
        both = (old / name).is_dir() and there.is_dir() and not (old / name).is_symlink() and not there.is_symlink()
        if both and (carried is None or name in carried):
            _settle(old / name, there, None)
        elif not os.path.lexists(there) and name not in dropped:
            os.replace(old / name, there)
    shutil.rmtree(old, ignore_errors=True)


def _move_aside(src: Path, dest: Path) -> None:
    with _staging(dest) as aside:
        old = aside / dest.name
        os.replace(dest, old)
        try:
            os.replace(src, dest)
        except BaseException:
            os.replace(old, dest)
            raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` atomically (Linux renameat2 RENAME_EXCHANGE, macOS renamex_np RENAME_SWAP).
    False where the platform or file system cannot; other errors raise."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    linux, mac = getattr(libc, "renameat2", None), getattr(libc, "renamex_np", None)
    if linux is not None:
        linux.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        done = linux(-100, os.fsencode(a), -100, os.fsencode(b), 2)  # AT_FDCWD, RENAME_EXCHANGE
    elif mac is not None:
        mac.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        done = mac(os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
    else:
        return False
    if done == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
