"""Ahead-of-time compiles of the Triton kernels for real GPU targets, on a machine without a GPU.

The specialisations come from the launchers themselves: `record_launches()` makes `triton_common.launch`
record (kernel, grid, args, constexprs, blocks) instead of running, and `specialisations()` drives the forward
and backward launchers on tiny CPU tensors over a matrix of dtypes, methods, E, R and dropout, for one site and
for a group of GROUP_OUTS sites (`adapter_triton_group`: the kernels' GROUPED builds, and the input-gradient
kernel's adding variant). Builds are told apart as Triton's JIT tells them: argument types, constexprs, warps,
stages, and its specialisation of integer scalars (== 1 a constant, divisible by 16). `compile_launch()`
binds a recorded launch the way Triton's JIT does (its own binder: signature, alignment/divisibility attributes,
constexprs), compiles it with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` and reads the
cubin's registers, shared and local memory with `cuobjdump --dump-resource-usage`.

Must run without TRITON_INTERPRET=1 (the kernels must be JIT functions, not interpreted ones). Imports triton.
Used by `benchmarks/kernel_resources.py` (full matrix) and `tests/kernels/test_kernel_resources.py` (a subset).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from . import adapter_triton, blocks, triton_common
from .methods import method_spec

# Per-block opt-in shared memory (bytes): A100 (sm_80) 163 KB, H100 (sm_90) 227 KB, the 99 KB GPUs (sm_86 / sm_89 /
# sm_120: RTX 30 / 40 / 50, A10, L4, L40S) 99 KB (CUDA programming guide). The matrix builds sm_80 and sm_90 by
# default; `kernel_resources.py --archs 86,89,120` the others.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 120: 99 * 1024}
ARCHS = (80, 90)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPERTS = (1, 2, 4, 8, 16)
RANKS = (1, 4, 8, 16, 32, 64)
# Odd T, D and O multiples of 16 as in real models; T twice: few tokens (16 tokens per program and the splits over
# D and O, `triton_common.split_tiles`) and enough for the table's tiles to fill MIN_PROGRAMS programs.
SHAPES = ({"t": 33, "d": 96, "o": 80}, {"t": 64 * 264 + 7, "d": 96, "o": 80})
# The group the matrix drives besides one site: O per site, as q / k / v under grouped-query attention (O of k and v
# smaller than q's)
GROUP_OUTS = (80, 48, 48)
_CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@dataclass(frozen=True)
class Case:
    """One op configuration the matrix drives the launchers with."""

    dtype: str
    method: str
    e: int
    r: int
    dropout: bool

    def label(self) -> str:
        """A short human-readable name of the case."""
        return f"{self.dtype} {self.method} E={self.e} R={self.r} drop={int(self.dropout)}"


@dataclass(frozen=True)
class Spec:
    """One kernel specialisation, as a recorded launch: what Triton compiles once."""

    kernel: object
    args: tuple
    consts: dict
    num_warps: int
    num_stages: int
    case: Case
    sites: int = 1  # the sites of the launcher call that recorded it

    @property
    def name(self) -> str:
        """The kernel's function name."""
        return self.kernel.__name__

    def label(self) -> str:
        """The case's label, and the sites when a group's launch recorded it."""
        return self.case.label() + (f" G={self.sites}" if self.sites > 1 else "")

    def key(self) -> tuple:
        """What makes a distinct build: kernel, argument types and Triton's specialisation of the integer scalars
        (`_int_spec`), constexprs, warps and stages."""
        types = tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ + _int_spec(a)
                      for a in self.args)
        return (self.name, types, tuple(sorted(self.consts.items())), self.num_warps, self.num_stages)


def _int_spec(v) -> str:
    """How Triton's JIT specialises an integer argument: == 1 a constant, divisible by 16, beyond int32."""
    if isinstance(v, bool) or not isinstance(v, int):
        return ""
    return " 1" if v == 1 else (" D" if v % 16 == 0 else "") + (" i64" if not -2**31 <= v < 2**31 else "")


@contextlib.contextmanager
def record_launches():
    """Within: the launchers record their launches into the yielded list instead of running them."""
    launches: list = []
    old, triton_common.recorder = triton_common.recorder, launches
    try:
        yield launches
    finally:
        triton_common.recorder = old


def cases(dtypes=tuple(DTYPES), methods=("adamole", "mole", "lora"), experts=EXPERTS, ranks=RANKS,
          dropouts=(False, True)) -> list[Case]:
    """The matrix: every combination the op accepts (LoRA has exactly one expert)."""
    out = []
    for dt, m, e, r, p in itertools.product(dtypes, methods, experts, ranks, dropouts):
        fixed = method_spec(m).fixed_experts
        if fixed is None or e == fixed:
            out.append(Case(dt, m, e, r, p))
    return out


def _drive(case: Case) -> list:
    """Run the forward and backward launchers of `case` on small CPU tensors of each of SHAPES, for one site and
    for GROUP_OUTS sites, recording their launches -> [(sites, launches)]."""
    return [(len(outs), _drive_shape(case, outs, **shape)) for shape in SHAPES for outs in ((shape["o"],), GROUP_OUTS)]


def _drive_shape(case: Case, outs: tuple, t: int, d: int, o: int, device: str = "cpu") -> list:
    """One training forward + backward of sites of O `outs` (one: the per-site launchers) over x [T, D], its
    tensors on `device` (a GPU's: launches that `benchmarks/tune_blocks.py` replays and times)."""
    del o  # the outs say it
    dtype, spec = DTYPES[case.dtype], method_spec(case.method)
    e, r, n = case.e, case.r, len(outs)
    x = torch.zeros(t, d, dtype=dtype, device=device)

    def each(*shape, present=True):
        return [torch.zeros(*shape, dtype=dtype, device=device) if present else None for _ in outs]

    gates = each(e, d, present=spec.has_gate)
    thr_ws, thr_bs = each(1, d, present=spec.has_threshold), each(1, present=spec.has_threshold)
    masks = torch.ones(n, t, d, dtype=torch.bool, device=device) if case.dropout else None
    a_s, b_s = each(e * r, d), [torch.zeros(v, e * r, dtype=dtype, device=device) for v in outs]
    bases = [torch.zeros(t, v, dtype=dtype, device=device) for v in outs]
    top_k = min(2, e) if spec.uses_top_k else 0
    scalars = (case.method, e, top_k, 2.0, 1.0 / e, 1.0 / 0.95)
    with record_launches() as launches:
        if n == 1:
            mask = None if masks is None else masks[0]
            _, scores, _, za, zr, aux, sums = adapter_triton.adapter_triton(
                x, mask, a_s[0], b_s[0], gates[0], thr_ws[0], thr_bs[0], bases[0], *scalars, True)  # training
            adapter_triton.adapter_backward_triton(bases[0], scores if spec.has_gate else None, x, mask, a_s[0],
                                                   b_s[0], gates[0], thr_ws[0], thr_bs[0], za, zr, *scalars, True,
                                                   aux if aux.numel() else None, sums)
        else:
            _, scores, _, za, zr, aux, sums = adapter_triton.adapter_triton_group(
                x, masks, a_s, b_s, gates, thr_ws, thr_bs, bases, *scalars, True)
            adapter_triton.adapter_backward_triton_group(bases, scores if spec.has_gate else None, x, masks, a_s,
                                                         b_s, gates, thr_ws, thr_bs, za, zr, *scalars, True,
                                                         aux if aux.numel() else None, sums)
    return launches


def specialisations(matrix: list[Case]) -> list[Spec]:
    """The distinct kernel builds the launchers produce over `matrix` (first case that produced each)."""
    seen: dict[tuple, Spec] = {}
    for case in matrix:
        for sites, launches in _drive(case):
            for kernel, _grid, args, consts, blk in launches:
                spec = Spec(kernel, args, consts, blk.num_warps, blk.num_stages, case, sites)
                seen.setdefault(spec.key(), spec)
    return list(seen.values())


@dataclass(frozen=True)
class Usage:
    """Resources of one build: registers per thread, shared memory per block, local memory (spills) per thread."""

    registers: int
    shared: int
    local: int
    stack: int

    @property
    def spills(self) -> bool:
        """Does the build use local memory (register spills or a stack)?"""
        return self.local > 0 or self.stack > 0


def compile_launch(spec: Spec, arch: int):
    """Compile `spec` for sm_<arch> the way Triton's JIT would bind its arguments; -> the CompiledKernel."""
    if not hasattr(spec.kernel, "params"):
        raise RuntimeError("the kernels are interpreted (TRITON_INTERPRET=1): AOT compiles need JIT functions")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(spec.kernel.signature, spec.kernel.params, backend)
    kwargs = {**spec.consts, "num_warps": spec.num_warps, "num_stages": spec.num_stages}
    bound, specialization, options = binder(*spec.args, **kwargs)
    options, signature, constexprs, attrs = spec.kernel._pack_args(backend, kwargs, bound, specialization, options)
    src = ASTSource(spec.kernel, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def resource_usage(cubin: bytes) -> Usage:
    """Registers, shared, local and stack bytes of the (single) function in `cubin`, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([str(_CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    line = next(ln for ln in out.splitlines() if "REG:" in ln)

    def field(name):
        m = re.search(rf"\b{name}:(\d+)", line)
        return int(m.group(1)) if m else 0

    return Usage(field("REG"), field("SHARED"), field("LOCAL"), field("STACK"))


def measure(spec: Spec, arch: int) -> Usage:
    """Compile `spec` for sm_<arch> and read its resources; shared memory includes what the launch reserves."""
    compiled = compile_launch(spec, arch)
    usage = resource_usage(compiled.asm["cubin"])
    # Triton allocates the kernel's shared memory dynamically: the metadata has the real per-block figure.
    return Usage(usage.registers, max(usage.shared, compiled.metadata.shared), usage.local, usage.stack)


def problems(usage: Usage, arch: int, spec: Spec | None = None) -> list[str]:
    """Why a build would not run well on sm_<arch>: spills or more shared memory than a block may opt into; with
    its `spec`, also more shared memory than `blocks.shared_bytes` says its case's builds take (what
    `backend.device_unfit` holds a GPU's opt-in against)."""
    out = []
    if usage.spills:
        out.append(f"spills (local {usage.local} B, stack {usage.stack} B)")
    if usage.shared > SHARED_LIMIT[arch]:
        out.append(f"shared memory {usage.shared} B > {SHARED_LIMIT[arch]} B")
    if spec is not None:
        _, k_p, listed = shared_row(spec)
        if usage.shared > listed:
            out.append(f"shared memory {usage.shared} B > blocks.SHARED_BYTES's {listed} B at K_P {k_p}")
    return out


def shared_row(spec: Spec) -> tuple[str, int, int]:
    """The `blocks.SHARED_BYTES` row a build is held to: (dtype class, its case's K_P, the bytes listed)."""
    dtype, k_p = DTYPES[spec.case.dtype], blocks.padded_columns(spec.case.e, spec.case.r)
    return blocks.dtype_class(dtype), k_p, blocks.shared_bytes(k_p, dtype)
