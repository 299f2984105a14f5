"""Kernel launches without Triton's Python dispatch (issue 21).

Every `kernel[grid](*args)` runs `JITFunction.run` on the host: option knobs, a binder that specialises each
argument, a cache key built from that specialisation and `str` of the options, a lookup, then the launch of the
build found. A site makes 7 such launches per training step. Run up to Triton's C launcher on a CPU
(`benchmarks/_triton_host.py`), they took the tiny Llama step of `benchmarks/host_overhead.py` from 1.54x PEFT
LoRA (launches free) to 1.81-1.85x; through kept builds it is 1.62-1.65x.

Here a launch's first call still goes through `JITFunction.run`, which compiles (or finds) the build and returns
it. The build is kept under a key of our own, and later launches with the same key call it directly,
`build[grid](*args, *constexprs)`, with what `JITFunction.run` passes it: the grid padded to 3 dims, the runtime
arguments, then the constexprs in signature order. The key:
- the kernel and the plan's `Launch` (plans are cached: the same object for the same sizes and flags), which fix
  the constexprs, num_warps and num_stages;
- the current device (Triton keeps builds per device);
- the tensors' dtypes and whether their addresses are 16-byte aligned (Triton's pointer specialisation);
- the scalars' values and types (Triton specialises ints on == 1, divisibility by 16 and the i32 / i64 / u64
  range, all fixed by the value, and does not specialise floats; the type tells True from 1 and 1.0).
Every kernel takes its tensors first (`*_ptr`), then its scalars, then its constexprs.

This is at least as fine as Triton's own specialisation, so a kept build is the one Triton would launch for these
arguments; `tests/kernels/test_direct.py` checks that against Triton's binder for a CUDA target.

A kept build skips what else `JITFunction.run` checks per call: that the globals a kernel reads have not changed
since its build (ours read only the method codes, constants) and the debug knob (read when the build is made).

Relies on `JITFunction.run` returning the build it launched and on `CompiledKernel.__getitem__(grid)` (triton
3.6.0 and 3.9.0 checked: the same code in both). AMOLE_DIRECT_LAUNCH=0 launches through `JITFunction.run`
every time. Not used when the call is traced (inductor launches the kernels itself) or under Triton's
interpreter; a test or benchmark that hooks `JITFunction.run` to count launches turns it off
(`benchmarks/_counting.py`).
"""

from __future__ import annotations

import inspect
import os
from functools import reduce
from operator import attrgetter, or_

import torch
from triton.runtime.jit import JITFunction

ENABLED = os.environ.get("AMOLE_DIRECT_LAUNCH", "1") != "0"
MAX_BUILDS = 4096  # kept builds; past it the table starts over (a build is only a handle: Triton keeps its own)

_builds: dict = {}  # (id(kernel), Launch, device, arg_key) -> (build, 3-d grid, constexprs after the runtime args)
_device = None  # the active driver's get_current_device, bound at first use
_pointers: dict = {}  # id(kernel) -> its leading pointer parameters (`pointer_count`)
_data_ptr, _dtype = torch.Tensor.data_ptr, attrgetter("dtype")


def arg_key(args: tuple, n_ptr: int) -> tuple:
    """The specialisation of runtime `args` (`n_ptr` tensors, then scalars), at least as fine as Triton's (see the
    module doc): the tensors' dtypes and 16-byte alignment (one flag when all are aligned), the scalars' values and
    types. Built with C-level maps: it runs per launch."""
    tensors, scalars = args[:n_ptr], args[n_ptr:]
    ptrs = list(map(_data_ptr, tensors))
    aligned = True if not reduce(or_, ptrs, 0) & 15 else tuple([not p & 15 for p in ptrs])
    return tuple(map(_dtype, tensors)), aligned, scalars, tuple(map(type, scalars))


def pointer_count(kernel) -> int:
    """How many leading parameters of `kernel` are pointers (named `*_ptr`: tensors); the rest are scalars and
    constexprs (checked for every kernel by `tests/kernels/test_direct.py`)."""
    n = _pointers.get(id(kernel))
    if n is None:
        names = list(inspect.signature(kernel.fn).parameters)
        n = _pointers[id(kernel)] = next((i for i, name in enumerate(names) if not name.endswith("_ptr")), len(names))
        if any(name.endswith("_ptr") for name in names[n:]):
            raise TypeError(f"{kernel.fn.__name__}: pointer parameters must come first")
    return n


def current_device() -> int:
    """The device Triton launches on (its driver's current device)."""
    global _device
    if _device is None:
        from triton.runtime.driver import driver

        _device = driver.active.get_current_device
    return _device()


def takes(kernel) -> bool:
    """Is `kernel` launched through here (on, and a kernel Triton builds for a GPU: not interpreted)?"""
    return ENABLED and type(kernel) is JITFunction


def launch(kernel, plan, args: tuple) -> None:
    """`kernel[plan.grid](*args, **plan.kwargs)`, through a kept build when there is one."""
    # id(kernel): a JITFunction's own hash reads its source key under a lock
    key = (id(kernel), plan, current_device(), arg_key(args, pointer_count(kernel)))
    kept = _builds.get(key)
    if kept is not None:
        build, grid, tail = kept
        build[grid](*args, *tail)
        return
    build = kernel[plan.grid](*args, **plan.kwargs)
    if build is not None:  # None: a hooked run (tests, benchmarks) launched nothing we could keep
        if len(_builds) >= MAX_BUILDS:
            _builds.clear()
        grid = (*plan.grid, *(1,) * (3 - len(plan.grid)))  # a build's launcher reads 3 grid dims; run pads them
        _builds[key] = (build, grid, constexpr_tail(kernel, plan, args))


def constexpr_tail(kernel, plan, args: tuple) -> tuple:
    """The values `JITFunction.run` passes its build after the runtime `args`: the signature's remaining
    parameters (all constexprs), from the plan or their defaults."""
    bound = kernel.signature.bind(*args, **plan.constexprs)
    bound.apply_defaults()
    values = tuple(bound.arguments.values())
    late = [p.name for p in kernel.params[len(args):] if not p.is_constexpr]
    if late or any(p.is_constexpr for p in kernel.params[:len(args)]):
        raise TypeError(f"{kernel.fn.__name__}: runtime arguments must come before the constexprs, got {late}")
    return values[len(args):]


def clear() -> None:
    """Forget the kept builds (tests)."""
    _builds.clear()
