"""DDP and FSDP2 (`fully_shard`) of a transformed model on torchrun: 2 CPU processes, gloo.

What is compared. Each rank trains on its half of a fixed global batch and minimises its own
`task + AUX_COEF * aux` (the aux loss of its shard: every site's routing statistics are over the tokens that rank
saw). DDP and FSDP2 average the ranks' gradients, so a step follows the gradient of the mean over shards of
`task(shard) + AUX_COEF * aux(shard)`. The single-process reference optimises exactly that: each step, one
forward and backward per shard of the same global batch, each loss divided by the number of shards, then one
AdamW step. (The task part equals the full-batch mean since the shards have the same number of tokens; the aux
part is not the full batch's aux loss, which is a product of batch means.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import _dist_worker as worker
import pytest
import torch

import amole_compile as ac

from models import build

pytestmark = pytest.mark.slow
WORLD = 2
TESTS = Path(__file__).resolve().parents[1]  # tests/, where _dist_worker.py lives
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args: str, timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node 2 script args` on CPU; fails with its output shown."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(script), *args]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    # Its own session, so that a timeout kills the ranks too, not only the launcher (orphaned ranks would hold
    # the CPU for the rest of the suite).
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=TESTS.parent, start_new_session=True) as popen:
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            out, err = popen.communicate()
            pytest.fail(f"{' '.join(cmd)} timed out after {timeout}s\nstdout:\n{out}\nstderr:\n{err[-10000:]}")
    proc = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-5000:]}\n"
                    f"stderr:\n{proc.stderr[-10000:]}")
    return proc


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    """One torchrun launch runs both modes (DDP, then FSDP2); the tests read what each rank wrote."""
    out = tmp_path_factory.mktemp("dist")
    torchrun(TESTS / "_dist_worker.py", str(out), "ddp", "fsdp2")
    return out


@pytest.fixture(scope="module")
def reference() -> tuple[list[float], dict[str, torch.Tensor], torch.nn.Module]:
    """Single process, whole global batch: each step averages the per-shard losses (see module docstring)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = worker.build_model()
        losses = worker.train(model, [worker.shards(worker.global_batch(), WORLD)] * worker.STEPS)
    finally:
        torch.set_num_threads(threads)
    return losses, worker.adapter_state(model), model


def load(out: Path, mode: str) -> list[dict]:
    return [torch.load(out / f"{mode}_rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_ranks_identical_and_match_single_process(ranks, reference, mode):
    ref_losses, ref_state, _ = reference
    got = load(ranks, mode)
    assert got[0]["state"].keys() == got[1]["state"].keys() == ref_state.keys()
    assert len(ref_state) == 2 * 4 * 5  # 2 layers x q,k,v,o x (A, B, gate, threshold w, b)
    for name in ref_state:
        assert torch.equal(got[0]["state"][name], got[1]["state"][name]), f"ranks differ at {name}"
        torch.testing.assert_close(got[0]["state"][name], ref_state[name], rtol=1e-5, atol=1e-5, msg=name)
    fresh = worker.build_model()
    for name, p in fresh.named_parameters():  # the run really trained every adapter parameter
        if name in ref_state:
            assert (ref_state[name] - p.detach()).abs().max() > 1e-3, f"{name} did not move"
    mean_losses = [sum(r["losses"][i] for r in got) / WORLD for i in range(worker.STEPS)]  # the objective
    torch.testing.assert_close(torch.tensor(mean_losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    assert ref_losses[-1] < ref_losses[0]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_base_state_dict_of_wrapped_model_is_the_plain_base(ranks, reference, mode):
    """`base_state_dict` of the DDP-wrapped / FSDP2-sharded model: full tensors under the base model's key names
    (no `module.` prefix, no `.base_layer`, no adapters), unchanged by training."""
    got = torch.load(ranks / f"{mode}_base.pt", weights_only=True)
    torch.manual_seed(0)
    base = build("llama", attention_dropout=0.0)  # what build_model transforms, before any training
    assert got.keys() == base.state_dict().keys()
    for key, value in base.state_dict().items():
        assert torch.equal(got[key], value), key
    assert ac.base_state_dict(reference[2]).keys() == got.keys()
