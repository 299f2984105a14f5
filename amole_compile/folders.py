"""Whole folders written as transactions (`files.py` has the mechanism, for single files): a folder is staged
beside its destination, then swapped in for the earlier one in one step.

    staged_folder(dest)              a temporary folder beside `dest`, for `move_files` / `swap_folder`
    move_files(src, dest)            the files of a staged folder into an existing folder, one rename each
    atomic_folder(dest)              a whole folder, swapped in for an earlier folder of that name
    swap_folder(src, dest, keep)     a staged folder swapped in for an earlier one, the entries it keeps carried

A swap is one rename where the OS can exchange two paths (Linux renameat2, macOS renamex_np); elsewhere a kill
between two renames can leave the old folder moved aside, restored by nobody. A mount point (a container's
volume) cannot be swapped: its files are placed one by one, from a staging folder inside it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from .files import _finish, _fsync, _place, _staging, mount_point


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
    """Under the lock of the folder that holds `dest`: an empty temporary folder named like `dest` (in
    `.<name>.XXXXXXXX.tmp` beside it, inside it for a mount point: `files._staging`), removed on exit; the
    caller places its contents (`move_files`, `move_folder`, `swap_folder`)."""
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
    aside (into a temporary folder beside it), put back if the rename fails and removed once it succeeded. A
    mount point `dest` gets the files of `src` one rename each, then loses its other entries."""
    src, dest = Path(src), Path(dest)
    if mount_point(dest):  # not replaceable: its entries are (`staged_folder` staged `src` inside it)
        _refill(src, dest)
        return dest
    _finish_tree(src)
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
    `dest` holds something else than files, folders and links, the process works in `dest`, or `dest` is a
    mount point: the caller then places the files one by one."""
    src, dest = Path(src), Path(dest)
    if _holds_cwd(dest) or mount_point(dest):  # the process would work in the removed folder; no swap there
        return False
    _finish_tree(src)  # before any second name is in
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


def _finish_tree(src: Path) -> None:
    """`files._finish` every file under the staged folder `src` (not the links)."""
    _finish(*[p for p in src.rglob("*") if p.is_file() and not p.is_symlink()])


def _refill(src: Path, dest: Path) -> None:
    """`dest` (a mount point) holding exactly what `src` (a staging folder inside it) holds: its files renamed
    in, then the other entries of `dest` removed, but for the staging folder that holds `src`."""
    names = set(move_files(src, dest))
    for entry in os.scandir(dest):
        if entry.name not in names and Path(entry.path) not in src.parents:
            _unlink_tree(Path(entry.path))


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
