"""Triton kernels for the AdaMoLE op. Importing this package does not import triton; the kernel modules do."""

from __future__ import annotations

import importlib.util
import os

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
