"""Which kernels run the op: the `kernels` setting (`AdaMoLEConfig.kernels`, overridden by the environment
variable `AMOLE_KERNELS`), resolved per call to "torch" or "triton". Imports no triton."""

from __future__ import annotations

import importlib.util
import os

import torch

KERNELS = ("auto", "torch", "triton")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ENV_VAR = "AMOLE_KERNELS"


def triton_usable(x: torch.Tensor, explicit: bool = False) -> tuple[bool, str]:
    """Can the Triton kernels run on x? -> (ok, reason when not).

    'auto' (explicit=False) picks Triton only for CUDA tensors. An explicit request also accepts CPU tensors
    when TRITON_INTERPRET=1 (Triton's interpreter: how CI runs the kernels).
    """
    if importlib.util.find_spec("triton") is None:
        return False, "the 'triton' package is not installed (pip install 'amole-compile[triton]')"
    if x.dtype not in SUPPORTED_DTYPES:
        return False, f"dtype {x.dtype} is not supported by the Triton kernels (float32, bfloat16, float16)"
    if x.device.type == "cuda":
        return True, ""
    if explicit and x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, (f"no Triton backend for device '{x.device.type}': the kernels need a CUDA device, "
                   "or TRITON_INTERPRET=1 for CPU tensors")


def resolve_kernels(requested: str, x: torch.Tensor) -> str:
    """The `kernels` setting ('auto' | 'torch' | 'triton'; AMOLE_KERNELS overrides) -> 'torch' or 'triton'."""
    choice = os.environ.get(ENV_VAR, requested) or "auto"
    if choice not in KERNELS:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(KERNELS)}; got {choice!r}")
    if choice == "torch":
        return "torch"
    ok, why = triton_usable(x, explicit=choice == "triton")
    if choice == "triton" and not ok:
        raise RuntimeError(f"amole kernels='triton' was asked for but cannot run: {why}")
    return "triton" if ok else "torch"
