"""A GPU the kernels' builds cannot run on takes the torch path before any launch: a compute capability below the
one the AOT matrix builds for, or a block shared-memory opt-in below what the builds take at the call's K_P
(`blocks.SHARED_BYTES`). Triton itself raises `OutOfResources` only at the first launch, inside a training step;
a 99 KB GPU (RTX 3090 / 4090, A10, L4, L40S) met that at K_P 512 and 1024. The devices are stood in for: fake CUDA
tensors and `backend._device_facts` patched with each GPU's own figures."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from amole_compile.kernels import backend, blocks, op

# compute capability, per-block shared memory opt-in (bytes, as CUDA reports them)
GPUS = {0: ((8, 9), 101376),  # RTX 4090 / L4 / L40S (sm_86 and sm_120 alike)
        1: ((9, 0), 232448),  # H100
        2: ((7, 5), 65536),   # T4
        3: ((8, 0), 166912)}  # A100


@pytest.fixture
def gpus(monkeypatch):
    monkeypatch.setattr(backend, "_device_facts", lambda index: GPUS[index])
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setattr(op, "_EAGER_CHOICE", {})
    monkeypatch.delenv(backend.ENV_VAR, raising=False)


def cuda(index: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    with FakeTensorMode():
        return torch.empty(16, 64, device=f"cuda:{index}", dtype=dtype)  # [T, D]


def test_shared_memory_and_capability_are_named(gpus):
    dev = torch.device
    # E 8, rank 4 (K_P 32) runs on every GPU from sm_80; E 16, rank 64 (K_P 1024) needs 132 KB
    assert backend.device_unfit(dev("cuda", 0), torch.bfloat16, 8, 4) == ""
    why = backend.device_unfit(dev("cuda", 0), torch.bfloat16, 16, 64)
    need = blocks.shared_bytes(1024, torch.bfloat16)
    assert need > 101376 and f"need {need} B" in why and "opt into 101376 B" in why and "8.9" in why, why
    assert backend.device_unfit(dev("cuda", 1), torch.bfloat16, 16, 64) == ""
    assert backend.device_unfit(dev("cuda", 3), torch.float32, 16, 64) == ""
    assert backend.device_unfit(dev("cuda", 0), torch.float32, 8, 32) == ""  # K_P 256 fits 99 KB
    assert backend.device_unfit(dev("cuda", 0), torch.float32, 16, 32) != ""  # K_P 512
    why = backend.device_unfit(dev("cuda", 2), torch.float16, 8, 4)
    assert "compute capability 7.5" in why and "8.0 and newer" in why, why
    assert backend.device_unfit(dev("cpu"), torch.bfloat16, 16, 64) == ""


def falls_back_once(x: torch.Tensor, num_experts: int, rank: int, match: str) -> None:
    """'auto' takes the torch path for x, with a warning matching `match` the first time and none after."""
    with pytest.warns(UserWarning, match=match):
        assert backend.resolve_kernels("auto", x, num_experts=num_experts, rank=rank) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.resolve_kernels("auto", x, num_experts=num_experts, rank=rank) == "torch"


def test_auto_takes_the_torch_path_with_one_warning_and_triton_raises(gpus):
    x = cuda(0)
    falls_back_once(x, 16, 64, "opt into 101376 B")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.resolve_kernels("auto", x, num_experts=8, rank=4) == "triton"
        assert backend.resolve_kernels("auto", cuda(1), num_experts=16, rank=64) == "triton"
    with pytest.raises(RuntimeError, match="kernels='triton' was asked for but cannot run: .*opt into 101376 B"):
        backend.resolve_kernels("triton", x, num_experts=16, rank=64)
    with pytest.raises(RuntimeError, match="compute capability 7.5"):
        backend.resolve_kernels("triton", cuda(2, torch.float16), num_experts=8, rank=4)


def test_the_eager_choice_is_remembered_per_device(gpus):
    """Two GPUs of one machine may differ: the choice for one is not reused for the other."""
    with pytest.warns(UserWarning, match="shared memory"):
        assert op.eager_triton("auto", cuda(0), 16, 16 * 64, 64) is False
    assert op.eager_triton("auto", cuda(1), 16, 16 * 64, 64) is True
    assert op.eager_triton("auto", cuda(0), 16, 16 * 64, 64) is False


def test_shared_bytes_rows():
    for cls, rows in blocks.SHARED_BYTES.items():
        limits = [k_p for k_p, _ in rows]
        assert limits == sorted(limits) and limits[-1] == blocks.MAX_K_P, (cls, limits)
    dtype = {"fp32": torch.float32, "16bit": torch.bfloat16}
    for cls, rows in blocks.SHARED_BYTES.items():
        for k_p, n in rows:
            assert blocks.shared_bytes(k_p, dtype[cls]) == n
    assert blocks.shared_bytes(512, torch.float16) == blocks.shared_bytes(512, torch.bfloat16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA device")
def test_without_a_cuda_device_here_nothing_is_held_against():
    """Fake CUDA tensors traced on a CPU (an export for a GPU elsewhere): its limits are unknown here, so the
    kernels stay chosen, as before."""
    backend._device_facts.cache_clear()
    try:
        assert backend.device_unfit(torch.device("cuda", 0), torch.bfloat16, 16, 64) == ""
        assert backend._device_facts(0) is None
    finally:
        backend._device_facts.cache_clear()


def test_facts_are_read_once_per_device_and_a_missing_limit_is_not_held_against(monkeypatch):
    """A torch that reports no per-block opt-in (an older or non-NVIDIA build) leaves the shared-memory check out
    rather than failing; the capability check stays."""
    from types import SimpleNamespace

    asked = []

    def props(index):
        asked.append(index)
        return SimpleNamespace(major=8, minor=6) if index == 0 else SimpleNamespace(major=7, minor=0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    backend._device_facts.cache_clear()
    try:
        assert backend.device_unfit(torch.device("cuda", 0), torch.bfloat16, 16, 64) == ""
        assert backend.device_unfit(torch.device("cuda", 0), torch.float32, 8, 4) == ""
        assert "compute capability 7.0" in backend.device_unfit(torch.device("cuda", 1), torch.float16, 8, 4)
        assert asked == [0, 1]
    finally:
        backend._device_facts.cache_clear()
