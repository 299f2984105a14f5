"""Shared test setup: Triton's interpreter on machines without CUDA (sped up: `triton_interpreter.py`), quiet
logs, deterministic seeds, and tiny Hugging Face models built from config (no downloads)."""

from __future__ import annotations

import os
import sys

# Before anything imports triton: without a GPU the kernels run in Triton's interpreter.
if os.environ.get("CUDA_VISIBLE_DEVICES", None) != "" and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/upstream_loop.py, tests/models.py, ...

from models import ARCHS, build

if os.environ.get("TRITON_INTERPRET") == "1":
    import triton_interpreter

    triton_interpreter.install()  # device-function calls scan triton.language once, not per call (see its doc)

# Test files that share a session-scoped fixture, by group: pytest-xdist runs a group's files on one worker, so
# that fixture is built once, not on each worker (an ONNX export pair: 20-45 s). `test_house.py` checks that the
# files using each session-scoped fixture of a conftest are in one group.
SHARED_FIXTURE_GROUPS = {
    "tests/export/test_onnx_export.py": "export-session-fixtures",
    "tests/export/test_onnx_runtime.py": "export-session-fixtures",
}


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown to a run without xdist (-p no:xdist)
def pytest_xdist_make_scheduler(config, log):
    """pyproject's `--dist loadfile` (a test file's tests on one worker: its module-scoped fixtures built once),
    with the files of a `SHARED_FIXTURE_GROUPS` group as one file. (xdist's `loadgroup` marks do not take under
    pytest 9.2: xdist 3.8 writes the group into `item._nodeid`, which pytest no longer reads.)"""
    from xdist.scheduler import LoadFileScheduling

    if config.getvalue("dist") != "loadfile":
        return None

    class _Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return SHARED_FIXTURE_GROUPS.get(path, path)

    return _Scheduling(config, log)


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
