"""save_pretrained's folder: the base as transformers writes it and our adapters, swapped in for an earlier save
in one step (`save_staged`), and which of the earlier save's files the new one replaces (`_replaced`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from ..files import folder_lock, staging_of, version_of
from ..folders import move_files, staged_folder, swap_folder
from .format import CONFIG_FILE, LEGACY_CONFIG_FILE, WEIGHTS_FILE, is_ours, refuse_foreign, write_adapters


def save_staged(model: nn.Module, dest: Path, save_base, adapters: dict[str, torch.Tensor]):
    """transformers writes the base into a temporary folder beside `dest`, and the adapters go beside it. The
    finished folder is then swapped for `dest` in one step (`folders.swap_folder`), also over an earlier save:
    the entries of `dest` this save does not replace are carried over (second names, not copies), except the
    earlier adapters and the earlier base's weight files that the new base replaces (`_replaced`). Where the
    swap cannot be made (no hard links; `dest` is the working directory or a mount point), each file is renamed
    into place instead (index files last), the adapters are committed after them, and the replaced files are
    removed."""
    dest.mkdir(parents=True, exist_ok=True)
    with staged_folder(dest) as tmp, folder_lock(dest):
        refuse_foreign(dest)
        out = save_base(tmp)
        write_adapters(model, tmp, adapters)
        dropped = _replaced(dest, sorted(os.listdir(tmp)))
        if not swap_folder(tmp, dest, keep=lambda name: name not in dropped):
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                os.unlink(tmp / name)  # committed below, after the base
            move_files(tmp, dest, last=lambda name: name.endswith(".index.json"))
            write_adapters(model, dest, adapters)
            _remove_replaced(dest, dropped)
    return out


_SHARD = re.compile(r"(?P<prefix>.*?)-\d{5}-of-\d{5}")


def _bare(name: str) -> str:
    """A weights file's name without its format suffixes: `model-00001-of-00002.safetensors` ->
    `model-00001-of-00002`."""
    return name.replace(".bin", "").replace(".safetensors", "")


def _replaced(dest: Path, written: list[str]) -> set[str]:
    """The entries of an earlier save `dest` that a save writing `written` drops: the weight shards
    (`model-00001-of-00003.safetensors`) of the weight files it wrote that it did not write itself
    (transformers' own clean-up), the unsharded form of a weights file it wrote sharded and the other way
    round, our earlier adapter files (a legacy config only where it is ours) and what killed writes of them
    left (versioned weights, staging folders)."""
    def stem(name: str) -> str | None:
        found = _SHARD.fullmatch(_bare(name))
        return found["prefix"] if found else (_bare(name) if _bare(name) != name else None)

    prefixes = {stem(n) for n in written if n != WEIGHTS_FILE} - {None}
    out = {CONFIG_FILE, WEIGHTS_FILE} | ({LEGACY_CONFIG_FILE} if is_ours(dest / LEGACY_CONFIG_FILE) else set())
    # the other form of a weights file it wrote: an earlier unsharded file that a loader would read before the
    # new index (transformers keeps it), or an earlier index beside a new unsharded file
    out |= {n.removesuffix(".index.json") if n.endswith(".index.json") else f"{n}.index.json"
            for n in written if n != WEIGHTS_FILE and n.endswith((".safetensors", ".bin", ".index.json"))
            and not _SHARD.fullmatch(_bare(n))} - set(written)
    for entry in os.scandir(dest):
        found = _SHARD.fullmatch(_bare(entry.name))
        if (found and found["prefix"] in prefixes and entry.name not in written and entry.is_file()) \
                or version_of(entry.name, WEIGHTS_FILE) or staging_of(entry.name, CONFIG_FILE) \
                or staging_of(entry.name, WEIGHTS_FILE):
            out.add(entry.name)
    return out


def _remove_replaced(dest: Path, dropped: set[str]) -> None:
    """Remove the earlier base's files among `dropped` (`_replaced`), where the earlier save was not swapped out
    whole (our adapter files were committed anew)."""
    for name in dropped - {CONFIG_FILE, WEIGHTS_FILE, LEGACY_CONFIG_FILE}:
        path = dest / name
        if path.is_file():
            os.unlink(path)
