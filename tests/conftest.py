"""Shared test setup: Triton's interpreter on machines without CUDA, quiet logs, deterministic seeds, and
tiny Hugging Face models built from config (no downloads)."""

from __future__ import annotations

import os
import sys

# Before anything imports triton: without a GPU the kernels run in Triton's interpreter.
if os.environ.get("CUDA_VISIBLE_DEVICES", None) != "" and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/upstream_loop.py, tests/models.py

from models import ARCHS, build


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=sorted(ARCHS))
def arch(request):
    return request.param


@pytest.fixture
def tiny(arch):
    return build(arch)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (small Trainer runs: threads only add overhead), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
