"""Launches without Triton's Python dispatch (`kernels/direct.py`), checked against Triton itself on a CPU:
- the key is at least as fine as the specialisation Triton's binder gives for a CUDA target, so a kept build is
  the one `JITFunction.run` would launch;
- a kept build gets exactly the arguments `JITFunction.run` passes (binder's bound values), for every kernel the
  launchers make;
- the first launch goes through `JITFunction.run`, later ones with the same key call the kept build; a new
  alignment, dtype, device or plan goes through `JITFunction.run` again.

The session's kernels are interpreted (TRITON_INTERPRET=1); JIT functions are made here from their Python
functions, and `run` is replaced by a stand-in (no GPU: nothing is compiled).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from amole_compile.kernels import _aot as aot
from amole_compile.kernels import direct, triton_common
from amole_compile.kernels.blocks import Blocks
from amole_compile.kernels.plans import Launch

BACKEND = make_backend(GPUTarget("cuda", 90, 32))


def _probe(p_ptr, q_ptr, s, t):  # a kernel's runtime parameters: pointers first, then scalars (never compiled)
    pass


PROBE = JITFunction(_probe)
PROBE_BINDER = create_function_from_signature(PROBE.signature, PROBE.params, BACKEND)


def triton_spec(*args) -> tuple:
    """Triton's specialisation of the probe's arguments, for a CUDA sm_90 target."""
    _, spec, _ = PROBE_BINDER(*args)
    return tuple(tuple(s) if isinstance(s, (tuple, list)) else s for s in spec)


def tensors() -> list[torch.Tensor]:
    """Tensors of several dtypes at 16-byte aligned and unaligned addresses."""
    out = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.bool, torch.int64):
        base = torch.zeros(64, dtype=dtype)
        out += [base, base[1:], base[8:], base[16:], base[3:]]
    return out


INTS = [0, 1, 2, 3, 15, 16, 17, 32, 48, -1, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**32, 2**63 - 16, 2**63,
        2**64 - 16]
FLOATS = [0.0, 1.0, 0.5, 16.0, -3.25, 1e30]
SCALARS = INTS + FLOATS + [True, False]


def assert_key_decides(arg_lists) -> None:
    """Argument lists of the probe with equal `arg_key` have equal Triton specialisations."""
    seen: dict = {}
    for args in arg_lists:
        key, spec = direct.arg_key(tuple(args), direct.pointer_count(PROBE)), triton_spec(*args)
        assert seen.setdefault(key, spec) == spec, (args, key, seen[key], spec)


def test_key_is_at_least_as_fine_as_tritons_specialisation():
    assert direct.pointer_count(PROBE) == 2
    pool = tensors()
    assert_key_decides([a, b, 0, 0.0] for a in pool for b in pool)  # both tensors: dtypes, each's alignment
    assert_key_decides([pool[0], pool[0], v, w] for v in SCALARS for w in SCALARS)  # scalars of every kind
    # the check has teeth: Triton tells these apart, so a key that did not would fail it
    t = torch.zeros(8)
    for a, b in ((1, 2), (16, 17), (1, True), (1, 1.0), (2**31 - 1, 2**31)):
        assert triton_spec(t, t, a, 0) != triton_spec(t, t, b, 0)
        assert direct.arg_key((t, t, a, 0), 2) != direct.arg_key((t, t, b, 0), 2)
    assert triton_spec(t, t[1:], 0, 0) != triton_spec(t, t[4:], 0, 0) != triton_spec(t[1:], t[4:], 0, 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**64 - 1), min_size=2, max_size=6))
def test_ints_of_one_key_specialise_alike(values):
    t = torch.zeros(4)
    assert_key_decides([t, t, v, 0] for v in values)


def test_every_kernel_takes_its_tensors_first():
    """`pointer_count`'s convention, over the launches of every method, dtype and dropout setting: the `*_ptr`
    arguments are tensors and come first, the rest are ints, floats or bools."""
    cases = [aot.Case(dt, m, e, 4, p) for dt in ("bfloat16", "float32") for m, e in (("adamole", 8), ("mole", 4),
                                                                                      ("lora", 1)) for p in (0, 1)]
    seen = set()
    for spec in aot.specialisations(cases):
        n = direct.pointer_count(spec.kernel)
        assert all(isinstance(a, torch.Tensor) for a in spec.args[:n]), spec.kernel.fn.__name__
        assert all(type(a) in (int, float, bool) for a in spec.args[n:]), spec.kernel.fn.__name__
        seen.add(spec.kernel.fn.__name__)
    assert len(seen) == 7

    def bad(x_ptr, n, y_ptr):
        pass

    with pytest.raises(TypeError, match="pointer parameters must come first"):
        direct.pointer_count(JITFunction(bad))


def _recorded() -> list[tuple[JITFunction, aot.Spec]]:
    """One launch of each kernel as the launchers make it (bf16 AdaMoLE with dropout and aux; fp32 LoRA), as
    (a JIT function of the kernel, the recorded launch)."""
    out = {}
    for case in (aot.Case("bfloat16", "adamole", 8, 4, True), aot.Case("float32", "lora", 1, 8, False)):
        for spec in aot.specialisations([case]):
            out.setdefault(spec.kernel.fn.__name__, (JITFunction(spec.kernel.fn), spec))
    return list(out.values())


def _plan(spec: aot.Spec, grid=(1, 1, 1)) -> Launch:
    return Launch(grid, spec.consts, Blocks(bt=16, bd=16, num_warps=spec.num_warps, num_stages=spec.num_stages))


def test_a_kept_build_gets_what_jit_run_passes_for_every_kernel():
    recorded = _recorded()
    names = {k.fn.__name__ for k, _ in recorded}
    assert len(names) == 7, names  # forward 2, backward 5
    for kernel, spec in recorded:
        binder = create_function_from_signature(kernel.signature, kernel.params, BACKEND)
        kwargs = {**spec.consts, "num_warps": spec.num_warps, "num_stages": spec.num_stages}
        bound, _, _ = binder(*spec.args, **kwargs)
        plan = _plan(spec)
        ours = (*spec.args, *direct.constexpr_tail(kernel, plan, spec.args))
        theirs = tuple(bound.values())
        assert len(ours) == len(theirs), kernel.fn.__name__
        assert all(a is b or a == b for a, b in zip(ours, theirs, strict=True)), kernel.fn.__name__


class FakeBuild:
    """Stands in for a CompiledKernel: `build[grid](*args)` records the launch."""

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("build", grid, args))


@pytest.fixture
def fake_kernel(monkeypatch):
    """(a JIT function whose `run` records and returns a FakeBuild, its plan, its args, the calls)."""
    kernel, spec = next(r for r in _recorded() if r[0].fn.__name__ == "_fwd_kernel")
    calls: list = []
    build = FakeBuild(calls)

    def run(*args, grid, warmup, **kwargs):
        calls.append(("run", grid, args))
        return build

    monkeypatch.setattr(kernel, "run", run, raising=False)
    monkeypatch.setattr(direct, "_device", lambda: 0)
    monkeypatch.setattr(direct, "ENABLED", True)
    direct.clear()
    yield kernel, _plan(spec, (5, 1, 1)), spec.args, calls
    direct.clear()


def test_first_launch_goes_through_jit_run_later_ones_call_the_build(fake_kernel, monkeypatch):
    kernel, plan, args, calls = fake_kernel
    tail = direct.constexpr_tail(kernel, plan, args)
    for _ in range(3):
        triton_common.launch(kernel, plan, args, wrap=False)
    assert [c[0] for c in calls] == ["run", "build", "build"]
    assert calls[1] == ("build", (5, 1, 1), (*args, *tail))
    # what changes the key goes through JITFunction.run again: an unaligned tensor, another dtype, device, plan
    x = args[0]
    unaligned = torch.zeros(x.numel() + 1, dtype=x.dtype)[1:].view_as(x)
    other_dtype = x.float() if x.dtype != torch.float32 else x.half()
    for changed in ((unaligned, *args[1:]), (other_dtype, *args[1:])):
        calls.clear()
        triton_common.launch(kernel, plan, changed, wrap=False)
        triton_common.launch(kernel, plan, changed, wrap=False)
        assert [c[0] for c in calls] == ["run", "build"]
    calls.clear()
    monkeypatch.setattr(direct, "_device", lambda: 1)
    triton_common.launch(kernel, plan, args, wrap=False)
    triton_common.launch(kernel, Launch(plan.grid, plan.constexprs, plan.blk), args, wrap=False)
    assert [c[0] for c in calls] == ["run", "run"]


def test_a_full_table_starts_over(fake_kernel, monkeypatch):
    kernel, plan, args, calls = fake_kernel
    monkeypatch.setattr(direct, "MAX_BUILDS", 2)
    plans = [Launch(plan.grid, plan.constexprs, plan.blk) for _ in range(3)]
    for p in plans:  # the third build finds the table full: it starts over with that one
        triton_common.launch(kernel, p, args, wrap=False)
    assert len(direct._builds) == 1 and [c[0] for c in calls] == ["run"] * 3
    calls.clear()
    for p in plans[::-1]:
        triton_common.launch(kernel, p, args, wrap=False)
    assert [c[0] for c in calls] == ["build", "run", "run"]


def test_off_hooked_or_traced_launches_go_through_jit_run(fake_kernel, monkeypatch):
    kernel, plan, args, calls = fake_kernel
    monkeypatch.setattr(direct, "ENABLED", False)
    for _ in range(2):
        triton_common.launch(kernel, plan, args, wrap=False)
    assert [c[0] for c in calls] == ["run", "run"] and not direct._builds
    monkeypatch.setattr(direct, "ENABLED", True)
    calls.clear()
    monkeypatch.setattr(kernel, "run", lambda *a, grid, warmup, **k: calls.append(("hooked", grid, a)))
    for _ in range(2):  # a hooked run returns no build: nothing is kept
        triton_common.launch(kernel, plan, args, wrap=False)
    assert [c[0] for c in calls] == ["hooked", "hooked"] and not direct._builds
    session_kernel = aot.specialisations([aot.Case("float32", "lora", 1, 8, False)])[0].kernel
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    assert direct.takes(session_kernel) is not interpreted  # the interpreter's kernels: never kept


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="a kept build's own launch needs a GPU (the prepared device command runs this file)")
def test_kept_builds_compute_what_jit_run_computes_on_a_gpu(monkeypatch):
    """On CUDA: a fwd + bwd launched through `JITFunction.run` every time, then warm through kept builds (no
    `run` call at all), give bit-identical outputs and gradients (the same builds, deterministic kernels)."""
    from test_adapter_kernels import make, run_both

    runs = []
    real_run = JITFunction.run

    def counted(self, *args, **kwargs):
        runs.append(self)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "run", counted)
    direct.clear()
    for dtype in (torch.float32, torch.bfloat16):
        args = make("adamole", e=8, r=4, dtype=dtype)
        with monkeypatch.context() as m:
            m.setattr(direct, "ENABLED", False)
            _, jit, _, jit_b = run_both(args, dtype)
        run_both(args, dtype)  # keeps the builds
        runs.clear()
        _, kept, _, kept_b = run_both(args, dtype)
        assert runs == [] and direct._builds, "a warm call went through JITFunction.run"
        for a, b in zip((*jit, *jit_b), (*kept, *kept_b), strict=True):
            assert torch.equal(a, b)
    direct.clear()


@pytest.mark.slow
def test_a_real_build_is_launched_as_jit_run_launches_it():
    """A kernel's first launch through the real `JITFunction.run` (which compiles it for sm_90 on this CPU) and its
    second through the kept build reach the build's C launcher with the same arguments: grid padded to 3 dims,
    stream, function, packed metadata, launch metadata, hooks, the bound arguments; for a plan's 1-D grid (a build's
    launcher reads grid[0..2] unpadded) and a 2-D one. And the kernels read no global but constants (a kept build
    skips JITFunction.run's check of them). In a subprocess: this session's Triton runs its interpreter, which
    cannot compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_direct; " \
             "test_direct.real_build_check(); print('ok')"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def real_build_check() -> None:
    """The body of the test above, with the kernels compiled (not interpreted)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from _triton_host import use_stand_in_driver

    stand_in = use_stand_in_driver(record=True)
    direct.clear()
    for name, grid in (("_bwd_reduce_kernel", (7,)), ("_fwd_kernel", (3, 2))):
        kernel, spec = next(r for r in _recorded() if r[0].fn.__name__ == name)
        plan = _plan(spec, grid)
        assert direct.takes(kernel)
        for _ in range(3):  # JITFunction.run, then the kept build twice
            triton_common.launch(kernel, plan, spec.args, wrap=False)
        assert len(direct._builds) == 1 + (name == "_fwd_kernel")
        first, *kept = stand_in.launched
        assert first[:3] == (*grid, *(1,) * (3 - len(grid))) and len(kept) == 2
        for call in kept:
            assert len(call) == len(first) and type(call[6]) is type(first[6])  # launch metadata: made per call
            assert all(a is b or a == b for i, (a, b) in enumerate(zip(call, first, strict=True)) if i != 6)
        stand_in.launched.clear()
    # a kept build skips JITFunction.run's per-call check that the globals a kernel reads are unchanged since its
    # build: the kernels may read only constants (the method codes)
    for kernel, _ in _recorded():
        kernel.cache_key  # noqa: B018  (works out used_global_vals)
        names = {name for name, _ in kernel.used_global_vals}
        assert names <= {"ADAMOLE_CODE", "LORA_CODE"}, (kernel.fn.__name__, names)

