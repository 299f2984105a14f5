"""The single-process examples run (each must finish well under 2 minutes on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script: str, *args: str) -> str:
    r = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_transform_and_inspect():
    out = run("transform_and_inspect.py")
    assert out.count("self_attn") == 8 and "identical logits: True" in out


@pytest.mark.slow
def test_train_compiled():
    out = run("train_compiled.py", "--steps", "30")
    assert "30 compiled steps" in out and "mean active experts" in out


@pytest.mark.slow
def test_export_and_serve(tmp_path):
    out = run("export_and_serve.py", "--out", str(tmp_path))
    diff = float(out.split("max |onnxruntime - PyTorch| = ")[1].split()[0])
    assert diff < 1e-4
    ours, ref = out.split("OnnxLM greedy ")[1].split(" | PyTorch ")
    assert ours.strip() == ref.strip()
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".onnx", ".onnx"]


@pytest.mark.slow
def test_serve_genai(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    out = run("serve_genai.py", "--out", str(tmp_path / "served"), "--steps", "20")
    assert out.count("same tokens as PyTorch: True") == 3, out
    assert "[fox] 'the" in out and "[experts] 'the" in out
    assert {"fox.onnx_adapter", "experts.onnx_adapter", "genai_config.json", "model.onnx", "tokenizer.json"} <= \
        {p.name for p in (tmp_path / "served").iterdir()}
