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


@pytest.mark.parametrize("args,needle", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--hidden", "40"], "multiple of 16"),
])
def test_demo_bad_arguments(args, needle, tmp_path):
    r = run_cli("demo", "--out", str(tmp_path / "d"), *args)
    assert r.returncode == 1 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
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
