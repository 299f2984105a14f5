"""What each command can check before any heavy import (torch, transformers, datasets): paths, formats and
the values argparse cannot see alone. `main` runs these first, so a wrong path comes back at once.

Imports nothing heavy; each check raises `CLIError` with one line.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

TRAIN_FORMATS = (".jsonl", ".json", ".csv", ".parquet")  # `train.FORMATS`' keys (train.py imports datasets)


class CLIError(Exception):
    """A user-facing error: printed as one line."""


def model_dir(path: str) -> Path:
    """A Hugging Face model directory (with config.json)."""
    p = Path(path)
    if not p.is_dir():
        raise CLIError(f"{path} is not a directory")
    if not (p / "config.json").is_file():
        raise CLIError(f"{path} is not a Hugging Face model directory (no config.json)")
    return p


def folder(path: str, what: str) -> Path:
    """An existing folder."""
    p = Path(path)
    if not p.is_dir():
        raise CLIError(f"{what} {path} is not a directory")
    return p


def parent_exists(path: str | None, what: str) -> None:
    """The folder a file will be written into exists (None: nothing will be written)."""
    if path is None:
        return
    parent = Path(path).expanduser().absolute().parent
    if not parent.is_dir():
        raise CLIError(f"{what} {path}: its folder {parent} does not exist")


def writable_folder(path: str, what: str) -> Path:
    """A folder that exists or can be made, and can be written to (made now, so that a long run fails first)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"{what} {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise CLIError(f"{what} {out} is not writable ({exc.strerror})") from exc
    return out


def writable_target(path: str, what: str) -> None:
    """A folder that exists and can be written to, or whose parent exists and can be: nothing is created (a probe
    file is made and removed)."""
    out = Path(path).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise CLIError(f"{what} {path} exists and is not a directory")
    where = out if out.is_dir() else out.parent
    if not where.is_dir():
        raise CLIError(f"{what} {path}: its folder {where} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=where):
            pass
    except OSError as exc:
        raise CLIError(f"{what} {path} is not writable ({exc.strerror})") from exc


def check_demo(args) -> None:
    """--hidden a multiple of 16 (heads of 16 dims); --out writable."""
    if args.hidden % 16:
        raise CLIError(f"--hidden must be a multiple of 16 (heads of 16 dims), got {args.hidden}")
    writable_folder(args.out, "--out")


def check_train(args) -> None:
    """The model folder, a data file of a known format (or a saved dataset folder), --eval-fraction in [0, 1)."""
    model_dir(args.model_dir)
    data = Path(args.data)
    if not data.exists():
        raise CLIError(f"{data}: no such file or directory")
    if data.is_file() and data.suffix.lower() not in TRAIN_FORMATS:
        raise CLIError(f"{data}: unknown data format {data.suffix!r}; use one of {list(TRAIN_FORMATS)} or a "
                       "directory saved by datasets.save_to_disk")
    if not 0 <= args.eval_fraction < 1:
        raise CLIError(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
    writable_target(args.out, "--out")


CHECKS = {
    "demo": check_demo,
    "inspect": lambda a: model_dir(a.model_dir),
    "stats": lambda a: (model_dir(a.model_dir), folder(a.adapter_dir, "adapter folder"),
                        parent_exists(a.json, "--json"), parent_exists(a.plot, "--plot")),
    "export": lambda a: (model_dir(a.model_dir), folder(a.adapter_dir, "adapter folder"),
                         parent_exists(a.out, "output")),
    "train": check_train,
    "generate": lambda a: (model_dir(a.model_dir), folder(a.adapters, "adapter folder")),
}


def check(args) -> None:
    """Run the command's cheap checks (CLIError on the first problem)."""
    fn = CHECKS.get(args.command)
    if fn is not None:
        fn(args)
