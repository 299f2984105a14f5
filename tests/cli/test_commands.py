"""The `amole-compile` command line: help, inspect, stats, export, demo, and one-line errors."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

import amole_compile as ac
from amole_compile.cli import main

from models import build

CLI = [sys.executable, "-m", "amole_compile.cli"]


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny llama saved with save_pretrained, and adapters trained a little for it."""
    import torch

    root = tmp_path_factory.mktemp("cli")
    base = build("llama")
    base.save_pretrained(root / "model")
    model = ac.transform(copy.deepcopy(base), ac.AdaMoLEConfig(dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ac.save_adapters(model, root / "adapters")
    return root


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "inspect", "stats", "export", "bench"):
        assert cmd in out


def test_inspect_lists_targets_without_loading_weights(saved, capsys):
    assert main(["inspect", str(saved / "model")]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "8 role site(s)" in out
    assert out.count("self_attn.") == 8 and "adapter parameters:" in out


def test_inspect_not_a_model_is_one_line(tmp_path):
    r = run_cli("inspect", str(tmp_path))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"amole-compile: error: {tmp_path} is not a Hugging Face model "
                                             "directory (no config.json)"]
    assert "Traceback" not in r.stderr


def test_debug_shows_the_traceback(tmp_path):
    r = run_cli("--debug", "inspect", str(tmp_path))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_stats_prints_and_writes(saved, tmp_path, capsys):
    assert main(["stats", str(saved / "model"), str(saved / "adapters"), "--batch", "2", "--seq", "8",
                 "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    assert "overall mean active experts" in out
    data = json.loads((tmp_path / "s.json").read_text())
    assert len(data["sites"]) == 8 and all(s["tokens"] == 16 for s in data["sites"])
    assert (tmp_path / "s.png").stat().st_size > 0


def test_export_with_mismatched_adapters_is_one_line_and_leaves_nothing(saved, tmp_path):
    other = ac.transform(build("gpt2"), ac.AdaMoLEConfig())
    ac.save_adapters(other, tmp_path / "gpt2_adapters")
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    r = run_cli("export", str(saved / "model"), str(tmp_path / "gpt2_adapters"), str(out))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("amole-compile: error: ")
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("args,needle,code", [
    (["--steps", "0"], "argument --steps: must be an integer >= 1, got 0", 2),  # argparse's status
    (["--hidden", "40"], "multiple of 16", 1),
])
def test_demo_bad_arguments(args, needle, code, tmp_path):
    r = run_cli("demo", "--out", str(tmp_path / "d"), *args)
    assert r.returncode == code and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").iterdir())


def test_demo_unwritable_output(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere: point --out at a file instead
        target = tmp_path / "file"
        target.write_text("x")
    else:
        target = tmp_path / "ro"
        target.mkdir(mode=0o500)
    r = run_cli("demo", "--out", str(target), "--steps", "5")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    r = run_cli("demo", "--out", str(tmp_path / "demo"), "--steps", "60", "--hidden", "64")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "all checks passed" in r.stdout
    names = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert names == ["adapters", "decoder.onnx", "expert_stats.json", "experts.png", "model.onnx"]
    for line in ("onnxruntime logits match PyTorch", "OnnxLM greedy generation equals PyTorch generate()"):
        assert f"[ok] {line}" in r.stdout
    window = "one pass over 64 held-out sequences (1536 tokens) after training"
    assert f"counted: eval-mode forwards since the last reset, real tokens only (those the attention_mask " \
           f"marks); {window}" in r.stdout  # the table says what it covers
    stats = json.loads((tmp_path / "demo" / "expert_stats.json").read_text())
    assert stats["scope"]["window"] == window and {s["tokens"] for s in stats["sites"]} == {1536}


@pytest.mark.parametrize("argv", [["inspect", "/nonexistent"], ["stats", "/nonexistent", "/x"],
                                  ["export", "/nonexistent", "/x", "/y.onnx"], ["train", "/nonexistent", "d.jsonl"],
                                  ["generate", "/nonexistent", "/x", "--prompt", "hi"]])
def test_paths_are_checked_before_any_heavy_import(argv):
    """A wrong path comes back in one line before torch (or transformers, datasets) is imported."""
    code = ("import sys; from amole_compile.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "1 []", r.stdout + r.stderr
    assert r.stderr.strip().startswith("amole-compile: error: /nonexistent") and len(r.stderr.splitlines()) == 1


def test_help_shows_every_default_and_every_option_has_help():
    from amole_compile.cli.parser import parser

    root = parser()
    commands = next(a for a in root._actions if a.dest == "command").choices
    for name, sub in commands.items():
        text = sub.format_help()
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
            shown = action.default is not None and action.default is not False
            if shown and action.option_strings:
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)


def test_library_warnings_are_hidden_and_ours_shown_in_one_line(monkeypatch, capsys):
    import warnings

    from amole_compile.cli import commands

    def noisy(args):
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
        warnings.warn("axis name 'x' ignored", UserWarning, stacklevel=1)
        warnings.warn("amole_compile: something of ours", RuntimeWarning, stacklevel=1)
        return 0

    monkeypatch.setitem(commands.COMMANDS, "bench", noisy)
    assert main(["bench", "layer"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["amole-compile: warning: something of ours"], err


def test_stats_without_text_says_its_tokens_are_random(saved, capsys):
    assert main(["stats", str(saved / "model"), str(saved / "adapters"), "--batch", "2", "--seq", "8"]) == 0
    assert "no --text: these statistics are of 2 x 8 random token ids" in capsys.readouterr().out
