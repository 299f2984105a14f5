"""Smoke test of examples/train_ddp.py: the command of its docstring, 2 CPU processes on torchrun (gloo)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import torchrun

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).parent.parent / "examples" / "train_ddp.py"


def test_train_ddp_example_runs_on_two_processes(tmp_path):
    steps = 4
    proc = torchrun(EXAMPLE, "--steps", str(steps), "--out", str(tmp_path), timeout=120)
    assert "torchrun --nproc_per_node 2 examples/train_ddp.py" in EXAMPLE.read_text()
    assert "2 processes (gloo), 8 adapted projections" in proc.stdout
    losses = [float(v) for v in re.findall(r"^step \d+: loss (\S+)$", proc.stdout, flags=re.M)]
    assert len(losses) == steps, proc.stdout  # printed once per step, by rank 0 only
    assert all(torch.isfinite(torch.tensor(losses)))
    assert len(json.loads((tmp_path / "amole_config.json").read_text())["adapters"]["default"]["targets"]) == 8
    lora_b = {k: t for k, t in load_file(str(tmp_path / "adapters.safetensors")).items() if k.endswith("lora_B")}
    assert len(lora_b) == 8 and all(t.abs().sum() > 0 for t in lora_b.values())  # trained away from zero init
