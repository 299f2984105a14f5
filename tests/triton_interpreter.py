"""A speed-up of Triton's interpreter (TRITON_INTERPRET=1) for the test suite: one patch, installed by conftest.

What: `triton.runtime.interpreter._patch_builtin(pkg, builder, scope)`, which swaps every Triton builtin of
`pkg` for its interpreter form, and finds them with `inspect.getmembers(pkg)` (`dir`, a `getattr` and a sort over
every attribute) on every call.

Why: the interpreter calls it for `tl`, `tl.tensor`, `tl.math` and `tl.core.tensor_descriptor_base` on every call
of a `@triton.jit` device function (`_patch_lang`), not only once per launch. The kernels call helpers (`_ld`,
`_sum_splits`, `_pad_cols`, ...) in every program, so the scans were about a quarter of an interpreted kernel
test's time: tests/kernels/test_adapter_kernels.py without its opcheck tests took 79 s, and 55 s with this patch.

How: each of those packages is scanned once, at install (no launch running: its builtins are unpatched), for the
names of its builtins; a call then looks at those names only and patches the ones that are still builtin (not
already swapped by an enclosing launch). It patches the same attributes as Triton's own function, in the same
order (`tests/test_triton_interpreter.py` compares them). Any other package goes to Triton's own function.

Checked: triton 3.9.0. Under another version nothing is installed; the suite runs as before, only slower.
"""

from __future__ import annotations

import inspect

CHECKED = ("3.9.0",)  # the triton versions whose interpreter this was checked against

_names: dict = {}  # package -> the names of its builtins, sorted (found at install)
_triton_patch_builtin = None  # triton's own function, kept while ours is installed
_is_builtin = _patch_attr = None  # triton's own helpers, bound at install (`patch_builtin` runs per device call)


def packages() -> tuple:
    """The packages the interpreter's `_patch_lang` passes to `_patch_builtin`."""
    import triton.language as tl

    return tl, tl.core, tl.tensor, tl.math, tl.core.tensor_descriptor_base


def install() -> bool:
    """Install the patch (TRITON_INTERPRET=1 must already be set, and no launch running) -> whether it is
    installed (False: another triton version)."""
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    global _triton_patch_builtin, _is_builtin, _patch_attr
    if triton.__version__ not in CHECKED:
        return False
    if _triton_patch_builtin is not None:
        return True
    if not tl.core.is_builtin(tl.load):
        raise RuntimeError("tests/triton_interpreter.py: installed while a launch had patched triton.language")
    _is_builtin, _patch_attr = tl.core.is_builtin, interpreter._patch_attr
    for pkg in packages():
        _names[pkg] = tuple(name for name, member in inspect.getmembers(pkg) if _is_builtin(member))
    _triton_patch_builtin = interpreter._patch_builtin
    interpreter._patch_builtin = patch_builtin
    return True


def patch_builtin(pkg, builder, scope) -> None:
    """`interpreter._patch_builtin` over the builtin names found at install."""
    names = _names.get(pkg)
    if names is None:
        return _triton_patch_builtin(pkg, builder, scope)
    for name in names:
        member = getattr(pkg, name)
        if _is_builtin(member):
            _patch_attr(pkg, name, member, builder, scope)
