"""Kill a writer at each of its steps: `kills(write, reset)` forks the test process once per step k; the child
runs `write()` with its k-th file-system step made its last (`os._exit`, as a kill would), and the parent then
checks what a reader sees. A step is a rename, link, unlink, chmod, folder creation or removal, a folder
exchange, or a file opened for writing (or a safetensors file saved): a kill there leaves a partial file of
that name, as a kill mid-write would. k runs 0, 1, 2, ... until the writer completes without being killed.

Forking keeps the imports and the models of the test process, so each run costs milliseconds. The child runs
torch on one thread (OpenMP's thread pool does not survive a fork: a parallel region would wait forever), and a
child that does not end within `TIMEOUT` seconds is killed and fails the test.
"""

from __future__ import annotations

import builtins
import io
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator

import pytest

KILLED = 77  # the child's exit status when it was killed at its step
TIMEOUT = 120.0
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="the fault tests fork the test process")


class _Steps:
    def __init__(self, kill_at: int) -> None:
        self.kill_at, self.done = kill_at, 0

    def step(self, partial: Callable[[], None] | None = None) -> None:
        if self.done == self.kill_at:
            if partial is not None:
                partial()
            os._exit(KILLED)
        self.done += 1


def _install(kill_at: int) -> None:
    """In the child: count every file-system step of the writer; the step `kill_at` ends the process."""
    from amole_compile import folders

    steps = _Steps(kill_at)
    real_open = builtins.open

    def partial_file(path) -> Callable[[], None]:
        def write() -> None:
            with real_open(path, "wb") as fh:
                fh.write(b"\x00partial")
        return write

    def before(fn):
        def wrapped(*args, **kwargs):
            steps.step()
            return fn(*args, **kwargs)
        return wrapped

    for module, name in [(os, "replace"), (os, "rename"), (os, "link"), (os, "unlink"), (os, "remove"),
                         (os, "rmdir"), (os, "mkdir"), (os, "chmod"), (tempfile, "mkdtemp"),
                         (shutil, "copyfile"), (folders, "_exchange")]:
        if hasattr(module, name):
            setattr(module, name, before(getattr(module, name)))

    def opening(file, mode="r", *args, **kwargs):
        if isinstance(mode, str) and any(c in mode for c in "wax+") and not isinstance(file, int):
            steps.step(partial_file(file))
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = opening
    import safetensors.torch as st

    real_save = st.save_file

    def save_file(tensors, filename, *args, **kwargs):
        steps.step(partial_file(filename))
        return real_save(tensors, filename, *args, **kwargs)

    st.save_file = save_file
    hf = sys.modules.get("transformers.modeling_utils")
    if hf is not None:
        hf.safe_save_file = save_file


def run_killed(write: Callable[[], object], kill_at: int) -> int:
    """Run `write()` in a forked child killed at its step `kill_at` -> the child's exit status (0: it completed,
    KILLED: it was killed; anything else: it raised, traceback on stderr)."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            import torch

            torch.set_num_threads(1)
            _install(kill_at)
            write()
        except BaseException:
            traceback.print_exc()
            code = 3
        os._exit(code)
    deadline = time.monotonic() + TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the writer, set to be killed at step {kill_at}, hung for {TIMEOUT:.0f} s")
        time.sleep(0.002)


def kills(write: Callable[[], object], reset: Callable[[], None], limit: int = 400) -> Iterator[int]:
    """For k = 0, 1, ...: `reset()` (the old state), run `write()` killed at its step k, and yield k for the
    caller's checks; stop when the writer completes. Raises when it fails otherwise or never completes."""
    for k in range(limit):
        reset()
        code = run_killed(write, k)
        if code == 0:
            return
        assert code == KILLED, f"the writer failed (exit {code}) when set to be killed at step {k}"
        yield k
    raise AssertionError(f"the writer did not complete in {limit} steps")
