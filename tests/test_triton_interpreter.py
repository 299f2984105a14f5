"""`tests/triton_interpreter.py`: the suite's patch of Triton's interpreter is installed for the versions it was
checked with, patches exactly what Triton's own function patches, and leaves the kernels' results as they were."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter is not in use")

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
import triton_interpreter  # noqa: E402
from triton.runtime import interpreter  # noqa: E402


@pytest.fixture
def theirs():
    """Triton's own `_patch_builtin` (the patch stays installed)."""
    if triton.__version__ not in triton_interpreter.CHECKED:
        pytest.skip(f"triton {triton.__version__}: the patch is not installed")
    return triton_interpreter._triton_patch_builtin


def test_installed_for_the_checked_versions():
    assert triton_interpreter.install() == (triton.__version__ in triton_interpreter.CHECKED)
    if triton.__version__ in triton_interpreter.CHECKED:
        assert interpreter._patch_builtin is triton_interpreter.patch_builtin


def _changes(fn, pkgs) -> list[tuple[int, str]]:
    """The attributes `fn` patches on each of `pkgs` in turn (each scope restored after)."""
    out = []
    for pkg in pkgs:
        scope = interpreter._LangPatchScope()
        fn(pkg, interpreter.interpreter_builder, scope)
        out += [(id(obj), name) for obj, name, _ in scope._changes]
        scope.restore()
    return out


PKGS = triton_interpreter.packages()


def test_patches_what_tritons_own_function_patches(theirs):
    ours = _changes(triton_interpreter.patch_builtin, PKGS)
    assert ours == _changes(theirs, PKGS) and len(ours) > 100
    assert tl.core.is_builtin(tl.load)  # all restored


def test_inside_a_launch_patches_what_tritons_own_function_patches(theirs):
    """Inside a launch (`tl` swapped already), as a device function's call finds it: both patch the same rest."""
    outer = interpreter._LangPatchScope()
    theirs(tl, interpreter.interpreter_builder, outer)
    try:
        assert not tl.core.is_builtin(tl.load)
        assert _changes(triton_interpreter.patch_builtin, PKGS) == _changes(theirs, PKGS)
    finally:
        outer.restore()
    assert tl.core.is_builtin(tl.load)


def test_kernels_compute_the_same_with_and_without_it(theirs, monkeypatch):
    from amole_compile.kernels.adapter_triton import adapter_triton
    from amole_compile.kernels.adapter_triton_bwd import adapter_backward_triton

    g = torch.Generator().manual_seed(0)
    t, d, o, e, r = 20, 24, 18, 4, 4
    x, keep = torch.randn(t, d, generator=g), torch.rand(t, d, generator=g) > 0.1  # [T, D]
    a, b = torch.randn(e * r, d, generator=g) * 0.3, torch.randn(o, e * r, generator=g) * 0.3  # [K, D], [O, K]
    gate, thr_w, thr_b = torch.randn(e, d, generator=g) * 0.4, torch.randn(1, d, generator=g) * 0.2, torch.zeros(1)
    grad = torch.randn(t, o, generator=g)  # [T, O]
    scalars = ("adamole", e, 0, 2.0, 1 / e, 1 / 0.9)

    def run():
        out = adapter_triton(x, keep, a, b, gate, thr_w, thr_b, None, *scalars, True)
        grads = adapter_backward_triton(grad, None, x, keep, a, b, gate, thr_w, thr_b, out[3], out[4], *scalars,
                                        True, torch.ones(()), out[6])
        return [v for v in (*out, *grads) if isinstance(v, torch.Tensor)]

    patched = run()
    monkeypatch.setattr(interpreter, "_patch_builtin", theirs)
    for ours, own in zip(patched, run(), strict=True):
        assert torch.equal(ours, own)
