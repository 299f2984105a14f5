"""Triton's host path, run on a machine without a GPU: its active driver is stood in for, so that the kernels
(compiled, not interpreted) build for sm_90 (ptxas runs on the CPU) and every launch runs Triton's own host code up
to its C launcher, which only counts:
- through `JITFunction.run`: option knobs, the binder's per-argument specialisation, the cache key and lookup,
  the launch metadata and hooks, the build's `run`;
- through a kept build (`amole_compile/kernels/direct.py`): our key, then the build's `__getitem__` runner (device,
  stream, launch metadata, hooks).

Neither the C launcher's argument packing nor the driver's launch is measured: both paths share them.

    python benchmarks/_triton_host.py       # the host µs per launch of each of the op's kernels, both ways

Needs a process whose kernels were defined without TRITON_INTERPRET=1 (`host_overhead.py` runs its step
measurement in one). The stand-in stays active for the process: Triton's builds release their modules through
the active driver when collected.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent.parent))


class StandInDriver:
    """Triton's active driver as JITFunction.run, a build's loading and its launcher ask it, for a CUDA sm_90
    target: device 0, stream 0, and a launcher that counts its calls (`launches`), and with `record` keeps their
    arguments (`launched`)."""

    def __init__(self, record: bool = False) -> None:
        self.launches, self.record, self.launched = 0, record, []
        self.utils = SimpleNamespace(get_device_properties=lambda device: {"max_shared_mem": 232448},
                                     load_binary=lambda *a: (self, 0, 32, 0, 1024),  # a module: loaded once
                                     unload_module=lambda module: None)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def launcher_cls(self, src, metadata):
        return self._launch

    def _launch(self, *args) -> None:
        self.launches += 1
        if self.record:
            self.launched.append(args)


def use_stand_in_driver(record: bool = False) -> StandInDriver:
    """Make a `StandInDriver` Triton's active driver for the rest of the process (see the module doc)."""
    from triton.runtime.driver import driver

    from amole_compile.kernels import adapter_triton, direct

    if type(adapter_triton._fwd_kernel).__name__ != "JITFunction":
        raise RuntimeError("the kernels are interpreted (TRITON_INTERPRET=1): Triton's host path needs them compiled")
    stand_in = StandInDriver(record)
    driver.set_active(stand_in)
    direct._device = stand_in.get_current_device
    return stand_in


def per_launch_us(reps: int = 3000) -> dict:
    """Host µs per launch of one recorded launch of each kernel (bf16 AdaMoLE, dropout, aux; the 7 kernels),
    through JITFunction.run and through a kept build, with the driver stood in for."""
    from amole_compile.kernels import _aot as aot
    from amole_compile.kernels import direct, triton_common
    from amole_compile.kernels.blocks import Blocks
    from amole_compile.kernels.plans import Launch

    use_stand_in_driver()
    out = {}
    for spec in aot.specialisations([aot.Case("bfloat16", "adamole", 8, 4, True)]):
        name = spec.kernel.fn.__name__
        if name in out:
            continue
        plan = Launch((3, 2), spec.consts, Blocks(16, 16, spec.num_warps, spec.num_stages))
        jit = lambda k=spec.kernel, p=plan, a=spec.args: k[p.grid](*a, **p.kwargs)  # noqa: E731
        kept = lambda k=spec.kernel, p=plan, a=spec.args: triton_common.launch(k, p, a, wrap=False)  # noqa: E731
        out[name] = {"JITFunction.run": _median_us(jit, reps), "kept build": _median_us(kept, reps)}
    direct.clear()
    return out


def _median_us(fn, reps: int) -> float:
    for _ in range(50):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


if __name__ == "__main__":
    print(json.dumps(per_launch_us(), indent=1))
