"""The registered op (`torch.ops.amole.adapter`, what the graph path inserts) under autocast computes in its
parameters' dtype, as the module path does: called inside a bf16 / fp16 autocast region on float32 tensors, its
outputs and every gradient equal the call without autocast, bit for bit, also when `backward()` runs inside the
region; a base in the autocast dtype (the projection ran under autocast) is added in the parameters' dtype and the
output takes the base's dtype back. Without the rule the torch path's backward raised on mixed dtypes and the
kernels' output came back in bf16."""

from __future__ import annotations

import pytest
import torch
from test_adapter_kernels import DEVICE, make
from test_op_shapes import KERNELS, LEAVES

from amole_compile.kernels import register

OP = register().adapter


def _call(args: dict, kernels: str, autocast: torch.dtype | None, backward_inside: bool = False,
          read_as: torch.dtype | None = None):
    """-> (outputs, gradients of a loss over out, the scores and the aux) with the leaves of `args`, the op called
    (and with `backward_inside`, differentiated) inside an autocast region of dtype `autocast` (None: none); the
    loss reads out cast to `read_as` (None: as it is)."""
    leaves = {k: (v.detach().clone().requires_grad_() if k in LEAVES and v is not None else v) for k, v in args.items()}
    w = torch.randn(args["base"].shape if args["base"] is not None else (args["x"].shape[0], args["lora_b"].shape[0]),
                    generator=torch.Generator().manual_seed(4)).to(DEVICE)
    ps = [leaves[k] for k in LEAVES if leaves[k] is not None]
    with torch.autocast(DEVICE, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = OP(*leaves.values(), kernels, True)
        loss = (out[0].to(read_as or out[0].dtype).float() * w).sum() + 0.3 * out[1].square().sum()
        if out[5].numel():  # (no aux without a gate)
            loss = loss + 1.7 * out[5]
        if backward_inside:
            return out, torch.autograd.grad(loss, ps)
    return out, torch.autograd.grad(loss, ps)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backward_inside", [False, True])
def test_autocast_leaves_a_float32_op_as_it_is(kernels, autocast, backward_inside):
    args = make("adamole", e=4, r=2, t=19, dropout=True, base=True)
    out, grads = _call(args, kernels, autocast, backward_inside)
    ref, ref_grads = _call(args, kernels, None)
    assert out[0].dtype == torch.float32
    for got, want in zip(out, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("method", ["adamole", "mole", "lora"])
def test_a_base_in_the_autocast_dtype_is_added_in_the_parameters_dtype(kernels, method):
    """base in bf16 (the projection's output under autocast), parameters and x in float32: the output is bf16, equal
    to the float32 op on the base cast up, then cast down; the base's gradient is bf16."""
    args = make(method, e=3, r=2, t=11, dropout=False, base=True)
    low = dict(args, base=args["base"].to(torch.bfloat16))
    out, grads = _call(low, kernels, torch.bfloat16)
    ref, ref_grads = _call(dict(args, base=low["base"].float()), kernels, None, read_as=torch.bfloat16)
    assert out[0].dtype == torch.bfloat16
    torch.testing.assert_close(out[0], ref[0].to(torch.bfloat16), rtol=0, atol=0)
    for got, want in zip(out[1:], ref[1:], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert grads[-1].dtype == torch.bfloat16
    torch.testing.assert_close(grads[-1], ref_grads[-1].to(torch.bfloat16), rtol=0, atol=0)
    for got, want in zip(grads[:-1], ref_grads[:-1], strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)
