"""Which kernels run the op: the `kernels` setting (`AdaMoLEConfig.kernels`, overridden by the environment
variable `AMOLE_KERNELS`), resolved per call to "torch" or "triton". Imports no triton.

Bad input never reaches a Triton compile: what the kernels cannot take (a dtype, more experts or padded columns
than the compile matrix covers, see `blocks.unsupported`) takes the torch path, with a one-time warning naming
why when the tensor is on a CUDA device (where 'auto' would have picked Triton), or raises naming the limit when
`kernels='triton'` was asked for.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

from .blocks import unsupported

KERNELS = ("auto", "torch", "triton")
# The path a traced (torch.compile) 'auto' call takes on a GPU: "triton" (the op's kernels, as user-defined Triton
# kernels in inductor's graph) or "torch" (the torch path, which inductor fuses itself). Set by a measurement:
# `benchmarks/gpu_check.py`'s "train compile" rows, "amole" (kernels) against "amole torch path", at the real
# fine-tuning shape. Not yet measured on a GPU (no device lent to issue 21 so far): the kernels until then.
COMPILED_AUTO = "triton"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ENV_VAR = "AMOLE_KERNELS"


@functools.cache
def _triton_installed() -> bool:
    """Is the 'triton' package importable (asked once: `find_spec` walks sys.path, ~10 us a call)?"""
    return importlib.util.find_spec("triton") is not None


def triton_usable(x: torch.Tensor, explicit: bool = False) -> tuple[bool, str]:
    """Can the Triton kernels run on x? -> (ok, reason when not).

    'auto' (explicit=False) picks Triton only for CUDA tensors. An explicit request also accepts CPU tensors
    when TRITON_INTERPRET=1 (Triton's interpreter: how CI runs the kernels).
    """
    if not _triton_installed():
        return False, "the 'triton' package is not installed (pip install 'amole-compile[triton]')"
    if x.dtype not in SUPPORTED_DTYPES:
        return False, f"dtype {x.dtype} is not supported by the Triton kernels (float32, bfloat16, float16)"
    if x.device.type == "cuda":
        return True, ""
    if explicit and x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, (f"no Triton backend for device '{x.device.type}': the kernels need a CUDA device, "
                   "or TRITON_INTERPRET=1 for CPU tensors")


_warned: set[str] = set()


def _on_gpu(x: torch.Tensor) -> bool:
    """Where 'auto' would pick the kernels (so taking the torch path is worth a warning)."""
    return x.device.type == "cuda"


def requested_kernels(requested: str) -> str:
    """The `kernels` setting in force: AMOLE_KERNELS when set, else `requested` ('' reads as 'auto')."""
    return os.environ.get(ENV_VAR, requested) or "auto"


def resolve_kernels(requested: str, x: torch.Tensor, num_experts: int = 1, rank: int = 1) -> str:
    """The `kernels` setting ('auto' | 'torch' | 'triton'; AMOLE_KERNELS overrides) -> 'torch' or 'triton' for a
    call on x [T, D] with E experts of rank R."""
    choice = requested_kernels(requested)
    if choice not in KERNELS:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(KERNELS)}; got {choice!r}")
    if choice == "torch":
        return "torch"
    ok, why = triton_usable(x, explicit=choice == "triton")
    if ok:
        why = unsupported(num_experts, rank)
        ok = not why
    if ok:
        return "triton"
    if choice == "triton":
        raise RuntimeError(f"amole kernels='triton' was asked for but cannot run: {why}")
    if _on_gpu(x) and why not in _warned:
        _warned.add(why)
        warnings.warn(f"amole: the Triton kernels cannot run this call, using the torch path: {why}", stacklevel=2)
    return "torch"


def traced(x: torch.Tensor) -> bool:
    """Is this call being captured (torch.compile, torch.export, make_fx, fake tensors)? Then the registered op
    and `wrap_triton` are what must appear; in plain eager mode the op and the kernels are called directly."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return True
    if type(x) is torch.Tensor and not (torch._C._len_torch_dispatch_stack()
                                        or torch._ops._len_torch_dispatch_stack_pre_dispatch()):
        return False  # a plain tensor and no dispatch mode (a proxy mode is one): ~0.3 us against ~3 below
    from torch._subclasses.fake_tensor import is_fake
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return is_fake(x) or get_proxy_mode() is not None
