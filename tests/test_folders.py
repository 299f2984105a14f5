"""folders.swap_folder: a staged folder swapped in for an earlier one in one step, the entries it keeps carried over
as second names (same files, modes untouched), what appears meanwhile moved across, and nothing touched where a
file system has no hard links."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from amole_compile import files, folders


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
    assert folders.swap_folder(_staged(dest), dest, _keep)
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
    real = folders._exchange

    def exchange(a, b):
        seen.append(_tree(b))  # what a reader sees just before: the earlier folder, whole
        done = real(a, b)
        seen.append(_tree(b))  # and just after: the new one, whole
        return done

    monkeypatch.setattr(folders, "_exchange", exchange)
    assert folders.swap_folder(_staged(dest), dest, _keep)
    if os.uname().sysname == "Linux":
        assert seen[0]["model.safetensors"] == "old weights" and "config.json" not in seen[0]
        assert seen[1] == _tree(dest)


def test_swap_folder_moves_across_what_appeared_meanwhile(tmp_path, monkeypatch):
    """A file another writer creates in `dest` (or in a carried folder) after the carry is not lost."""
    dest = _earlier(tmp_path)
    real = folders._exchange

    def exchange(a, b):
        (b / "late.log").write_text("late")
        (b / "checkpoint-1" / "late.json").write_text("late too")
        return real(a, b)

    monkeypatch.setattr(folders, "_exchange", exchange)
    assert folders.swap_folder(_staged(dest), dest, _keep)
    assert (dest / "late.log").read_text() == "late"
    assert (dest / "checkpoint-1" / "late.json").read_text() == "late too"
    assert not (dest / "model-00002-of-00002.safetensors").exists()  # dropped on purpose: not moved back


def test_swap_folder_replaced_entries_are_not_merged(tmp_path):
    """A folder the staged one writes anew replaces the earlier folder of that name whole."""
    dest = _earlier(tmp_path)
    src = _staged(dest)
    (src / "checkpoint-1").mkdir()
    (src / "checkpoint-1" / "state.json").write_text("new state")
    assert folders.swap_folder(src, dest, _keep)
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
    assert not folders.swap_folder(src, dest, _keep)
    assert _tree(dest) == before and _tree(src) == staged


def test_swap_folder_leaves_the_working_directory_in_place(tmp_path, monkeypatch):
    dest = _earlier(tmp_path)
    monkeypatch.chdir(dest / "checkpoint-1")
    before = _tree(dest)
    assert not folders.swap_folder(_staged(dest), dest, _keep)
    assert _tree(dest) == before and os.path.samefile(os.getcwd(), dest / "checkpoint-1")


# ---- mount points -------------------------------------------------------------------------------------------------
def _volume(tmp_path: Path, monkeypatch) -> Path:
    """tmp_path/"my vol", listed as a mount point (a bind mount: same device as its parent) in a stand-in for
    /proc/self/mountinfo, which escapes the space as \\040."""
    vol = tmp_path / "my vol"
    vol.mkdir()
    info = tmp_path / "mountinfo"
    path = str(vol.resolve()).replace(" ", "\\040")
    info.write_text(f"22 1 0:21 / / rw shared:1 - ext4 /dev/root rw\n"
                    f"97 22 0:21 /host/out {path} rw,relatime shared:1 - ext4 /dev/root rw\n")
    monkeypatch.setattr(files, "MOUNTINFO", info)
    return vol


def test_mount_point_reads_bind_mounts_from_mountinfo(tmp_path, monkeypatch):
    vol = _volume(tmp_path, monkeypatch)
    assert files.mount_point(vol) and files.mount_point(str(vol))
    assert not files.mount_point(tmp_path) and not files.mount_point(tmp_path / "missing")
    os.symlink(vol, tmp_path / "link")
    assert not files.mount_point(tmp_path / "link")  # a link to it is not one (renaming the link is fine)
    monkeypatch.setattr(files, "MOUNTINFO", tmp_path / "no such file")
    assert not files.mount_point(vol)  # elsewhere os.path.ismount alone


def test_a_mount_point_is_staged_inside_and_filled_file_by_file(tmp_path, monkeypatch):
    """A container's volume cannot be renamed onto or swapped: staging goes inside it (same mount), the folder
    stays the same folder, and it ends holding exactly the new content."""
    vol = _volume(tmp_path, monkeypatch)
    (vol / "old.txt").write_text("old")
    inode = vol.stat().st_ino
    monkeypatch.setattr(folders, "_exchange", lambda a, b: pytest.fail(f"exchanged {a} and {b}"))
    with folders.atomic_folder(vol) as tmp:
        assert vol in tmp.parents
        (tmp / "new.txt").write_text("new")
    assert _tree(vol) == {"new.txt": "new"} and vol.stat().st_ino == inode
    assert sorted(os.listdir(tmp_path)) == ["mountinfo", "my vol"]


def test_save_pretrained_into_a_mount_point(tmp_path, monkeypatch):
    """`save_pretrained("/output")` where /output is a Docker volume: staged inside it, placed file by file,
    twice (over its own earlier save), keeping the user's files."""
    import torch

    import amole_compile as ac

    from models import build

    vol = _volume(tmp_path, monkeypatch)
    monkeypatch.setattr(folders, "_exchange", lambda a, b: pytest.fail(f"exchanged {a} and {b}"))
    torch.manual_seed(0)
    model = build("llama")
    ac.transform(model, ac.AdaMoLEConfig(num_experts=2, rank=2))
    model.save_pretrained(vol)
    (vol / "tokenizer.json").write_text("{}")
    model.save_pretrained(vol)
    assert sorted(os.listdir(vol)) == ["adapters.safetensors", "amole_config.json", "config.json",
                                       "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(os.listdir(tmp_path)) == ["mountinfo", "my vol"]
    assert ac.adapter_names(ac.load_adapters(build("llama"), vol)) == ["default"]


def test_a_real_tmpfs_mount(tmp_path):
    """The same against a real mount where this process may mount one (root with CAP_SYS_ADMIN)."""
    import subprocess

    vol = tmp_path / "vol"
    vol.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(vol)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN)")
    try:
        assert files.mount_point(vol)
        (vol / "old.txt").write_text("old")
        with folders.atomic_folder(vol) as tmp:
            (tmp / "new.txt").write_text("new")
        assert _tree(vol) == {"new.txt": "new"}
    finally:
        subprocess.run(["umount", str(vol)], check=True)


def test_genai_out_dir_on_a_mount_point(tmp_path, monkeypatch):
    """export_genai's folder check on a volume: a killed export's staging folder inside it is not "something
    else", and writability is asked of the volume (its parent, such as `/`, may be read-only)."""
    from amole_compile.export import genai

    vol = _volume(tmp_path, monkeypatch)
    (vol / ".my vol.ab12cd34.tmp").mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path and access(p, mode))
    assert genai.check_out_dir(vol) == vol.absolute()
    with folders.atomic_folder(vol) as tmp:
        (tmp / "genai_config.json").write_text("{}")
    assert _tree(vol) == {"genai_config.json": "{}"}  # the leftover went with the write
    monkeypatch.setattr(files, "MOUNTINFO", tmp_path / "none")
    (tmp_path / "plain").mkdir()
    with pytest.raises(PermissionError, match="parent folder"):
        genai.check_out_dir(tmp_path / "plain")
