"""Which kernels run the op: the `kernels` setting (`AdaMoLEConfig.kernels`, overridden by the environment
variable `AMOLE_KERNELS`), resolved per call to "torch" or "triton". Imports no triton.

Bad input never reaches a Triton compile: what the kernels cannot take (a dtype, more experts or padded columns
than the compile matrix covers, see `blocks.unsupported`; a GPU they are not built for, or whose blocks may not
opt into the shared memory their builds need, see `device_unfit`, where Triton would raise `OutOfResources` at
the first launch, inside a training step; a call with more tokens than their 32-bit indexing reaches, see
`blocks.index_unfit`, where offsets would wrap and read or write the wrong rows) takes the torch path, with a
one-time warning naming why when the tensor is on a CUDA device (where 'auto' would have picked Triton), or
raises naming the limit when `kernels='triton'` was asked for. A build that fails anyway in an eager call (a GPU or
Triton version the AOT matrix does not cover) is caught by the op, which re-runs the call on the torch path and
sends calls like it there from then on, warned once (`unbuildable`; `kernels='triton'` raises).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

from .blocks import index_unfit, padded_columns, shared_bytes, unsupported

KERNELS = ("auto", "torch", "triton")
# The path a traced (torch.compile) 'auto' call takes on a GPU: "triton" (the op's kernels, as user-defined Triton
# kernels in inductor's graph) or "torch" (the torch path, which inductor fuses itself). Set by a measurement:
# `benchmarks/gpu_check.py`'s "train compile" rows, "amole" (kernels) against "amole torch path", at the real
# fine-tuning shape. Not yet measured on a GPU (no device lent to issue 21 so far): the kernels until then.
COMPILED_AUTO = "triton"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ENV_VAR = "AMOLE_KERNELS"
# The lowest compute capability the kernels are built and checked for: the AOT matrix compiles sm_80 and sm_90
# (benchmarks/kernel_resources.py); below it Triton's support differs (no bf16 dots before sm_80).
MIN_CAPABILITY = (8, 0)


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
# (device, dtype, E, R) -> why: a Triton build failed there, inside an eager call (`unbuildable`); those calls take
# the torch path from then on. `generation` counts the failures: the op's memos of its choice key on it.
_unbuildable: dict[tuple, str] = {}
generation = 0


def _on_gpu(x: torch.Tensor) -> bool:
    """Where 'auto' would pick the kernels (so taking the torch path is worth a warning)."""
    return x.device.type == "cuda"


def requested_kernels(requested: str) -> str:
    """The `kernels` setting in force: AMOLE_KERNELS when set, else `requested` ('' reads as 'auto')."""
    return os.environ.get(ENV_VAR, requested) or "auto"


def resolve_kernels(requested: str, x: torch.Tensor, num_experts: int = 1, rank: int = 1,
                    out_features: int | None = None, groups: int = 1) -> str:
    """The `kernels` setting ('auto' | 'torch' | 'triton'; AMOLE_KERNELS overrides) -> 'torch' or 'triton' for a
    call on x [..., D] with E experts of rank R; with `out_features` (the widest output or gradient row), also
    whether this call's tokens, for `groups` sites, stay within the kernels' 32-bit indexing (`index_unfit`)."""
    choice = requested_kernels(requested)
    if choice not in KERNELS:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(KERNELS)}; got {choice!r}")
    if choice == "torch":
        return "torch"
    ok, why = triton_usable(x, explicit=choice == "triton")
    if ok:
        why = (unsupported(num_experts, rank) or device_unfit(x.device, x.dtype, num_experts, rank)
               or _unbuilt(x, num_experts, rank))
        if not why and out_features is not None:
            d = x.shape[-1]
            why = index_unfit(x.numel() // max(d, 1), d, out_features, groups, padded_columns(num_experts, rank))
        ok = not why
    if ok:
        return "triton"
    if choice == "triton":
        raise _refusal(why)
    if _on_gpu(x):
        _warn_once(why, stacklevel=2)
    return "torch"


def _refusal(why: str) -> RuntimeError:
    """The error for `kernels='triton'` asked for where the kernels cannot run, `why`."""
    return RuntimeError(f"amole kernels='triton' was asked for but cannot run: {why}")


def _warn_once(why: str, stacklevel: int) -> None:
    """The one warning per reason that a call takes the torch path (`stacklevel` as `warnings.warn`'s, from the
    caller)."""
    if why not in _warned:
        _warned.add(why)
        warnings.warn(f"amole: the Triton kernels cannot run this call, using the torch path: {why}",
                      stacklevel=stacklevel + 1)


@functools.cache
def build_errors() -> tuple[type[BaseException], ...]:
    """What Triton raises when a kernel fails to build (compile error, ptxas failure, more shared memory or
    registers than the GPU has) as opposed to a failure of the kernel it launches, which must surface."""
    found = []
    for module, names in (("triton.compiler.errors", ("CompilationError",)),
                          ("triton.runtime.errors", ("OutOfResources", "PTXASError"))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(found)


def unbuildable(exc: BaseException, requested: str, x: torch.Tensor, num_experts: int, rank: int) -> None:
    """A kernel failed to build (`build_errors`) for an eager call on x with E experts of rank R: such calls take
    the torch path from now on (this one too: the caller re-runs it), with one warning naming the error; raises
    instead, naming it, where `kernels='triton'` was asked for. The issue's contract: a Triton compile error never
    comes out of a training step; the AOT matrix (sm_80, sm_90) and `device_unfit` keep the known ones away."""
    global generation
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    why = f"a Triton kernel failed to build for {x.device} ({x.dtype}, E = {num_experts}, rank {rank}): " \
          f"{type(exc).__name__}: {first}"
    _unbuildable[(x.device, x.dtype, num_experts, rank)] = why
    generation += 1
    if requested_kernels(requested) == "triton":
        raise _refusal(why) from exc
    _warn_once(why, stacklevel=3)


def builds(x: torch.Tensor, num_experts: int, rank: int) -> bool:
    """Has no kernel failed to build for calls like this one (`unbuildable`)?"""
    return not _unbuilt(x, num_experts, rank)


def _unbuilt(x: torch.Tensor, num_experts: int, rank: int) -> str:
    """Why a kernel did not build for calls like this one ('' if none failed; sizes traced symbolically, as
    under torch.compile(dynamic=True), are not looked up: eager calls record plain ints)."""
    if not _unbuildable or type(num_experts) is not int or type(rank) is not int:
        return ""
    return _unbuildable.get((x.device, x.dtype, num_experts, rank), "")


@functools.cache
def _device_facts(index: int | None) -> tuple[tuple[int, int], int | None] | None:
    """CUDA device `index`'s (compute capability, shared memory a block may opt into in bytes, None where torch
    does not say), asked once; None without a CUDA device here (fake CUDA tensors traced on a CPU: the GPU is
    elsewhere, its limits unknown)."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
    return (props.major, props.minor), getattr(props, "shared_memory_per_block_optin", None)


def device_unfit(device: torch.device, dtype: torch.dtype, num_experts: int, rank: int) -> str:
    """Why the kernels' builds for E experts of rank R in `dtype` cannot run on `device` ('' when they can, and for
    any device but a CUDA one): a compute capability below MIN_CAPABILITY, or a block shared-memory opt-in below
    what the builds take (`blocks.shared_bytes`: 99 KB GPUs such as sm_86 / sm_89 / sm_120 cannot take K_P >= 512).
    Nothing to hold against without a CUDA device here (tracing fake CUDA tensors on a CPU)."""
    facts = _device_facts(device.index) if device.type == "cuda" else None
    if facts is None:
        return ""
    (major, minor), optin = facts
    if (major, minor) < MIN_CAPABILITY:
        return (f"the GPU ({device}) has compute capability {major}.{minor}; the Triton kernels are built and "
                f"checked for {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} and newer")
    k_p = padded_columns(num_experts, rank)
    need = shared_bytes(k_p, dtype)
    if optin is not None and need > optin:
        return (f"at E = {num_experts}, rank {rank} (E_P * R_P = {k_p} padded columns) the kernels' {dtype} builds "
                f"need {need} B of shared memory per block; the GPU ({device}, compute capability "
                f"{major}.{minor}) lets a block opt into {optin} B")
    return ""


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
