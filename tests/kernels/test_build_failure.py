"""A Triton kernel that fails to build inside an eager call (a compile error, a ptxas failure, more shared memory
than the GPU has: a GPU or Triton version the AOT matrix does not cover) never comes out of the training step:
the op re-runs the call on the torch path, warns once naming the error, and sends calls like it there from then
on; `kernels='triton'` raises it, named. On every eager path (a folded node of one site or of linked q, k, v; the
unfolded op), whether the forward's or the backward's build fails. A failure of a launched kernel (not of its
build) still raises. The build error is injected at one kernel's launch; 'auto' picks the kernels as on a GPU.

Legend: T tokens, D in features.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_index_limit import _sites

from amole_compile.kernels import adapter_triton, adapter_triton_bwd, backend, op, op_linear, triton_usable

TRITON = triton_usable(torch.zeros(1), explicit=True)[0]
pytestmark = pytest.mark.skipif(not TRITON, reason="Triton is not usable here")
D, T = 32, 24


def _oor():
    from triton.runtime.errors import OutOfResources

    return OutOfResources(262144, 232448, "shared memory")


@pytest.fixture
def failing(monkeypatch):
    """'auto' picks the kernels as on a GPU (interpreted here), fresh memos, warnings and failures; -> a namespace:
    `fail` (kernel names whose launch raises `error()`), `error`, and `launches` (every launch's kernel name)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("AMOLE_KERNELS", raising=False)
    monkeypatch.setattr(backend, "triton_usable", lambda x, explicit=False: (True, ""))
    monkeypatch.setattr(backend, "_on_gpu", lambda x: True)
    for name, value in (("_warned", set()), ("_unbuildable", {}), ("generation", 0)):
        monkeypatch.setattr(backend, name, value)
    monkeypatch.setattr(op, "_EAGER_CHOICE", {})
    monkeypatch.setattr(op_linear, "_PLANS", {})
    state = type("State", (), {"fail": set(), "error": staticmethod(_oor), "launches": []})()

    def launching(real):
        def launch(kernel, plan, args, wrap):
            name = kernel.fn.__name__
            state.launches.append(name)
            if name in state.fail:
                raise state.error()
            return real(kernel, plan, args, wrap)
        return launch

    for module in (adapter_triton, adapter_triton_bwd):
        monkeypatch.setattr(module, "launch", launching(module.launch))
    return state


def _step(layers, seed: int = 1):
    """-> (outputs, x's gradient, the parameters' gradients, the aux losses) of one training step on x [2, T/2, D]
    (the same dropout masks for the same seed, on either path: both draw them with one bernoulli_ per site set)."""
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    x = torch.randn(2, T // 2, D, requires_grad=True)
    ys = [layer(x) for layer in layers]
    auxes = [site.aux for layer in layers for site in layer.group.values()]
    (sum((y * torch.linspace(-1, 1, D)).sum() for y in ys) + 0.1 * sum(auxes)).backward()
    return [*ys, x.grad, *[p.grad for layer in layers for p in layer.parameters() if p.requires_grad], *auxes]


def _pair(n: int, folded: bool):
    """(layers on 'auto', the same layers on the torch path); unfolded: a hook on each projection keeps the op apart
    from it."""
    mine = _sites(n, D, "auto", dropout=0.1, bias=True)
    ref = copy.deepcopy(mine)  # (one copy: the links among the siblings are kept)
    for layer in ref:
        for site in layer.group.values():
            site.kernels = "torch"
    if not folded:
        for layer in mine + ref:
            layer.base_layer.register_forward_hook(lambda mod, args, out: None)
    assert (mine[0].folding_group(torch.zeros(2, D)) is not None) == folded
    return mine, ref


SHAPES = [(1, True), (3, True), (1, False)]


@pytest.mark.parametrize("n, folded", SHAPES)
def test_a_forward_build_failure_reruns_the_call_on_the_torch_path(failing, n, folded):
    """The finishing kernel fails to build after the main one ran: the call's results are the torch path's
    exactly, and so is its backward; later calls launch nothing and do not warn again."""
    mine, ref = _pair(n, folded)
    failing.fail = {"_fwd_finish_kernel"}
    with pytest.warns(UserWarning, match="failed to build for cpu.*E = 4, rank 4.*OutOfResources"):
        got = _step(mine)
    assert failing.launches == ["_fwd_kernel", "_fwd_finish_kernel"]
    for a, b in zip(got, _step(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _later_calls_take_the_torch_path(failing, mine, ref)


@pytest.mark.parametrize("n, folded", SHAPES)
def test_a_backward_build_failure_finishes_the_backward_on_the_torch_path(failing, n, folded):
    """The weight-gradient kernel fails to build in the backward of a forward that ran on the kernels: the
    gradients come from the torch path on the forward's saved routing, equal to the torch path's own step."""
    mine, ref = _pair(n, folded)
    failing.fail = {"_bwd_weight_kernel"}
    with pytest.warns(UserWarning, match="failed to build.*OutOfResources"):
        got = _step(mine)
    assert "_fwd_kernel" in failing.launches and failing.launches[-1] == "_bwd_weight_kernel"
    for a, b in zip(got, _step(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # (the forward ran on the kernels: fp32 rounding)
    _later_calls_take_the_torch_path(failing, mine, ref)


def _later_calls_take_the_torch_path(failing, mine, ref) -> None:
    """The next step launches nothing, warns nothing and equals the torch path's exactly."""
    failing.launches.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _step(mine, seed=2)
    assert failing.launches == []
    for a, b in zip(got, _step(ref, seed=2), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("n, folded", SHAPES)
def test_triton_asked_for_raises_the_build_error_named(failing, n, folded):
    mine, _ = _pair(n, folded)
    for layer in mine:
        for site in layer.group.values():
            site.kernels = "triton"
    failing.fail = {"_fwd_kernel"}
    with pytest.raises(RuntimeError, match="kernels='triton' was asked for but cannot run: a Triton kernel failed to "
                                           "build.*OutOfResources") as info:
        _step(mine)
    assert type(info.value.__cause__).__name__ == "OutOfResources"


@pytest.mark.parametrize("n, folded", SHAPES)
def test_a_failing_kernel_is_not_a_failing_build(failing, n, folded):
    """An error from a kernel's run (not its build) raises as it came, and nothing is sent to the torch path."""
    mine, _ = _pair(n, folded)
    failing.fail = {"_fwd_kernel"}
    failing.error = staticmethod(lambda: RuntimeError("Triton Error [CUDA]: an illegal memory access"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _step(mine)
    assert backend._unbuildable == {}


def test_the_build_errors_are_tritons_own():
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    errors = backend.build_errors()
    assert CompilationError in errors and OutOfResources in errors
    assert not any(issubclass(RuntimeError, e) or e is Exception for e in errors)
