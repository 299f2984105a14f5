"""What a GPU would see of one piece of eager PyTorch, counted on a CPU: kernel-launching ATen ops, Triton launches,
new allocations (and zero-filled ones a kernel then overwrites entirely), host syncs.

    with Counter(run_kernels=True) as c:      # ATen ops through a TorchDispatchMode, Triton launches through
        loss.backward()                       # `KernelInterface.run` (InterpretedFunction / JITFunction)
    c.summary()                               # {"aten": 12, "triton": 4, "launches": 16, "allocs": ..., ...}

Triton launches are recorded (kernel name, grid) and, with `run_kernels`, run in Triton's interpreter (needs
TRITON_INTERPRET=1 when the kernels were defined, i.e. before `adapter_triton` is imported); without it they are
stubbed: outputs stay uninitialised, which is what host-time measurements want. A zero-filled allocation that
reaches a kernel untouched is filled with NaN first, and the kernel is run: if no NaN is left, the fill was wasted
(`overwritten`). Without running, such allocations are only counted as `zeroed_to_kernel`.

Counting rules (what a CUDA device would launch):
- a launch is any ATen op that is not a view / alias (schema alias info, plus `_unsafe_view`), not an allocation
  without a fill (`empty`, `empty_strided`, `new_empty`, `empty_like`...), not a metadata query and not a
  scalar read (`_local_scalar_dense`: a copy and a sync, counted as a sync);
- dropout is one launch, as CUDA's fused `native_dropout` (on CPU it dispatches bernoulli_, div_, mul), and
  its backward one (a mul by the mask);
- an allocation is a tensor output whose storage is not one of the op's inputs' (views and in-place ops excluded);
- a host sync is `_local_scalar_dense` (`.item()`, `int(t)`, `bool(t)`), or an op tagged data-dependent /
  dynamic-output-shape (`nonzero`, `masked_select`, `unique`...). A `.tolist()` or `.cpu()` of a CPU tensor
  dispatches nothing and is not seen here.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

ALLOC_ONLY = {aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default,
              aten.new_empty_strided.default, aten.empty_like.default}
METADATA = {aten._unsafe_view.default, aten.lift_fresh.default, aten.is_same_size.default,
            aten._has_compatible_shallow_copy_type.default, aten.sym_size.int, aten.sym_stride.int,
            aten.sym_numel.default, aten.sym_storage_offset.default}
FILLS = {aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default, aten.zero_.default,
         aten.fill_.Scalar, aten.full.default, aten.new_full.default, aten.full_like.default}
SYNCS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default}
_SYNC_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)


def is_view(func) -> bool:
    """A view or alias: its output shares the input's storage and no kernel runs."""
    rets = func._schema.returns
    return bool(rets) and rets[0].alias_info is not None and not rets[0].alias_info.is_write


def launches_kernel(func) -> bool:
    """Would this ATen op launch a CUDA kernel (see the module doc)?"""
    return not (is_view(func) or func in ALLOC_ONLY or func in METADATA or func in SYNCS)


def is_sync(func) -> bool:
    """Does this ATen op need the device's data on the host?"""
    return func in SYNCS or any(t in func.tags for t in _SYNC_TAGS)


def _key(t) -> int | None:
    if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.device.type == "meta":
        return None
    return t.untyped_storage().data_ptr()


@dataclass
class Launch:
    """One Triton launch: kernel name, grid, programs (product of the grid's dims)."""

    name: str
    grid: tuple

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


@dataclass
class Counter(TorchDispatchMode):
    """Counts as the module doc says; `ops` holds every ATen op name seen, `launch_ops` those that launch."""

    run_kernels: bool = False
    ops: list = field(default_factory=list)
    launch_ops: list = field(default_factory=list)
    allocs: list = field(default_factory=list)
    syncs: list = field(default_factory=list)
    triton: list = field(default_factory=list)
    zeroed_to_kernel: list = field(default_factory=list)
    overwritten: list = field(default_factory=list)
    _fresh_fills: dict = field(default_factory=dict)
    _drop_mask: int | None = None

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        inputs = {k for k in map(_key, tree_leaves((args, kwargs))) if k is not None}
        self._fresh_fills = {k: v for k, v in self._fresh_fills.items() if k not in inputs}  # read or written
        out = func(*args, **kwargs)
        self.ops.append(name)
        if launches_kernel(func) and not self._fused_dropout(name, args, inputs):
            self.launch_ops.append("native_dropout" if name == "bernoulli_" else name)
        if is_sync(func):
            self.syncs.append(name)
        if not is_view(func):
            for t in tree_leaves(out):
                k = _key(t)
                if k is not None and k not in inputs:
                    self.allocs.append(name)
                    if func in FILLS:
                        self._fresh_fills[k] = name
        return out

    def _fused_dropout(self, name: str, args, inputs: set) -> bool:
        """CPU dropout is bernoulli_ into a mask, div_ of the mask, mul by it; CUDA's `native_dropout` is one
        kernel: the bernoulli_ counts as that kernel, the div_ and the mul that follow it on its mask do not."""
        if name == "bernoulli_":
            self._drop_mask = _key(args[0])
            return False
        if self._drop_mask is not None and self._drop_mask in inputs and name in ("div_", "mul"):
            if name == "mul":
                self._drop_mask = None
            return True
        return False

    def on_launch(self, fn, args, grid, run) -> None:
        """A Triton launch of `fn` over `grid`: record it, check its zero-filled outputs, run it if asked."""
        self.triton.append(Launch(fn.__name__, tuple(grid)))
        fills = [(a, self._fresh_fills.pop(_key(a))) for a in args if _key(a) in self._fresh_fills]
        self.zeroed_to_kernel += [f"{fn.__name__}:{op}" for _, op in fills]
        if not self.run_kernels:
            return
        with _disable_current_modes():
            before = [a.clone() for a, _ in fills]
            for a, _ in fills:
                a.fill_(float("nan") if a.is_floating_point() else -7)
            run()
            for (a, op), old in zip(fills, before, strict=True):
                left = torch.isnan(a) if a.is_floating_point() else a == -7
                if not left.any():
                    self.overwritten.append(f"{fn.__name__}:{op}")
                a.copy_(torch.where(left, old, a))

    def summary(self) -> dict:
        """The counts, by kind."""
        return {"aten": len(self.launch_ops), "triton": len(self.triton),
                "launches": len(self.launch_ops) + len(self.triton), "allocs": len(self.allocs),
                "zeroed_to_kernel": len(self.zeroed_to_kernel), "overwritten": len(self.overwritten),
                "syncs": len(self.syncs)}


_active: list = []  # the innermost Counter (or None: stub without counting) that Triton launches report to


def _patched_run(orig):
    def run(self, *args, grid, warmup, **kwargs):
        if warmup or not _active:
            return orig(self, *args, grid=grid, warmup=warmup, **kwargs)
        counter = _active[-1]
        if counter is None:  # stubbed
            return None

        def go():
            return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

        grid_t = tuple(grid(kwargs) if callable(grid) else grid)
        counter.on_launch(self, args, grid_t + (1,) * (3 - len(grid_t)), go)
        return None

    run._amole_counting = True
    return run


def _kernel_classes() -> list:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return [InterpretedFunction, JITFunction]


@contextlib.contextmanager
def triton_hooked(counter: Counter | None):
    """Within: Triton launches report to `counter` (recorded, run when `counter.run_kernels`), or are skipped
    entirely when `counter` is None (stubbed: no recording, for host-time measurements). Every launch goes
    through the hooked `run`: `kernels/direct.py` keeps no builds meanwhile."""
    from amole_compile.kernels import direct

    saved = []
    for cls in _kernel_classes():
        if not getattr(cls.run, "_amole_counting", False):
            saved.append((cls, cls.run))
            cls.run = _patched_run(cls.run)
    enabled, direct.ENABLED = direct.ENABLED, False
    _active.append(counter)
    try:
        yield counter
    finally:
        _active.pop()
        direct.ENABLED = enabled
        for cls, orig in saved:
            cls.run = orig


@contextlib.contextmanager
def counting(run_kernels: bool = False):
    """Count ATen ops and Triton launches within (see `Counter`)."""
    counter = Counter(run_kernels=run_kernels)
    with triton_hooked(counter), counter:
        yield counter


def kernels_interpreted() -> bool:
    """Were the repo's Triton kernels defined under TRITON_INTERPRET=1 (so that they can run on CPU)?"""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import KernelInterface

    from amole_compile.kernels import adapter_triton

    kernels = [v for v in vars(adapter_triton).values() if isinstance(v, KernelInterface)]
    return bool(kernels) and all(isinstance(k, InterpretedFunction) for k in kernels)
