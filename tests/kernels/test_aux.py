"""The site's aux loss computed by the op (`with_aux`): the value and the gradient it sends into the router
equal the formula of docs/math.md, E * sum_e mean_t(mask) * mean_t(scores), on the torch path and on the Triton
kernels (TRITON_INTERPRET=1 on CPU), for every method with a gate; absent where it must be."""

from __future__ import annotations

import pytest
import torch
from test_adapter_kernels import DEVICE, make

from amole_compile.kernels import adapter, triton_usable
from amole_compile.kernels.adapter_torch import adapter_torch

PARAMS = ("x", "lora_a", "lora_b", "gate_w", "thr_w", "thr_b")
triton_ok = triton_usable(torch.zeros(1, device=DEVICE), explicit=True)[0]
KERNELS = ["torch"] + (["triton"] if triton_ok else [])


def formula(scores, mask, e):
    return e * (mask.to(scores.dtype).mean(0) * scores.mean(0)).sum()


def leaves(args):
    for k in PARAMS:
        if args[k] is not None:
            args[k] = args[k].clone().requires_grad_()
    return [args[k] for k in PARAMS if args[k] is not None]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize(("method", "t", "e"), [("adamole", 37, 4), ("adamole", 1, 2), ("mole", 70, 8),
                                                ("adamole", 130, 8), ("mole", 5, 3)])
def test_value_and_gradient_equal_the_formula(kernels, method, t, e):
    """The op's aux [] equals the formula of its own scores and mask, and its gradient through the router (x, the
    gate, the threshold) equals that of the formula applied to the op's differentiable scores."""
    args = make(method, e=e, r=4, t=t, dropout=False, thr_state="partial")
    ps = leaves(args)
    out = adapter(*args.values(), kernels, True)
    aux, sums = out[5], out[6]
    assert aux.shape == () and aux.dtype == torch.float32 and sums.shape == (2, e)
    want = formula(out[1], out[2], e)
    torch.testing.assert_close(aux, want, rtol=1e-5, atol=1e-6)
    got_g = torch.autograd.grad(aux * 1.7, ps, allow_unused=True)
    ref = adapter(*args.values(), kernels, False)
    assert ref[5].numel() == 0 and ref[6].numel() == 0  # not asked for: nothing computed
    want_g = torch.autograd.grad(formula(ref[1], ref[2], e) * 1.7, ps, allow_unused=True)
    for name, a, b in zip([k for k in PARAMS if args[k] is not None], got_g, want_g, strict=True):
        if b is None:
            assert a is None or not a.abs().max(), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("kernels", KERNELS)
def test_aux_and_scores_gradients_add(kernels):
    """A loss using both the scores and the aux gets the sum of both gradients."""
    args = make("adamole", e=4, r=4, t=29, dropout=True)
    ps = leaves(args)
    out = adapter(*args.values(), kernels, True)
    probe = torch.randn_like(out[1])
    got = torch.autograd.grad(out[0].square().mean() + (out[1] * probe).sum() + 3 * out[5], ps)
    ref = adapter(*args.values(), kernels, False)
    want = torch.autograd.grad(ref[0].square().mean() + (ref[1] * probe).sum() + 3 * formula(ref[1], ref[2], 4), ps)
    for name, a, b in zip(PARAMS, got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"grad {n}: {m}")


def test_gradcheck_float64():
    args = make("adamole", e=3, r=2, t=6, d=5, o=4, dtype=torch.float64, dropout=False)
    ps = leaves(args)
    names = [k for k in PARAMS if args[k] is not None]

    def aux(*vals):
        a = dict(args, **dict(zip(names, vals, strict=True)))
        return adapter(*a.values(), "torch", True)[5]

    assert torch.autograd.gradcheck(aux, tuple(ps))


@pytest.mark.parametrize("method", ["lora", "adamole"])
def test_absent_without_a_gate_or_tokens(method):
    args = make(method, e=4, r=4, t=0 if method == "adamole" else 9)
    out = adapter_torch(*args.values(), True)
    assert out[5].numel() == 0 and out[6].numel() == 0
