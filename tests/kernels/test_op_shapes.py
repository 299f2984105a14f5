"""`adapter()` on x [..., D]: an eager call flattens inside its autograd Function (no view of ours is recorded in
the autograd graph), a traced one around the registered op; the output [..., O], the per-token routing outputs
[T, ...] and every gradient equal those of the [T, D] call, on the torch path and the Triton kernels."""

from __future__ import annotations

import collections
import math

import pytest
import torch
from test_adapter_kernels import DEVICE, make
from torch.fx.experimental.proxy_tensor import make_fx

from amole_compile import AdaMoLEConfig
from amole_compile.kernels import adapter, triton_usable
from amole_compile.model.projection import AdaMoLELinear

LEAVES = ("x", "lora_a", "lora_b", "gate_w", "thr_w", "thr_b", "base")
KERNELS = ["torch"] + (["triton"] if triton_usable(torch.zeros(1, device=DEVICE), explicit=True)[0] else [])


def _leaves(args: dict, lead: tuple[int, ...] | None) -> dict:
    """A copy of the op's arguments, x, the keep-mask and base shaped [*lead, -1] (None: as made), the tensors
    that take gradients made leaves."""
    out = dict(args)
    for k in ("x", "drop_mask", "base"):
        if lead is not None and out[k] is not None:
            out[k] = out[k].reshape(*lead, out[k].shape[-1])
    for k in LEAVES:
        if out[k] is not None:
            out[k] = out[k].detach().clone().requires_grad_()
    return out


def _run(args: dict, kernels: str):
    out = adapter(*args.values(), kernels, True)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(out[0].shape, generator=g).to(out[0].device, out[0].dtype)
    loss = (out[0] * w).sum() + 0.3 * out[1].square().sum() + 1.7 * out[5]
    ps = [args[k] for k in LEAVES if args[k] is not None]
    return out, torch.autograd.grad(loss, ps)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("lead", [(3, 5), (2, 1, 4), ()])
def test_leading_dims_equal_the_flat_call(kernels, lead):
    args = make("adamole", e=4, r=4, t=math.prod(lead), dropout=True, base=True)
    out, grads = _run(_leaves(args, lead), kernels)
    ref, ref_grads = _run(_leaves(args, None), kernels)
    assert out[0].shape == (*lead, ref[0].shape[1])
    torch.testing.assert_close(out[0].reshape(ref[0].shape), ref[0], rtol=0, atol=0)
    for got, want in zip(out[1:], ref[1:], strict=True):  # scores, mask, za, zr, aux, aux sums: per token
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for name, got, want in zip([k for k in LEAVES if args[k] is not None], grads, ref_grads, strict=True):
        torch.testing.assert_close(got.reshape(want.shape), want, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    shaped = _leaves(args, lead)
    assert [g.shape for g in grads] == [shaped[k].shape for k in LEAVES if shaped[k] is not None]


def test_traced_call_flattens_around_the_registered_op():
    args = make("adamole", e=4, r=4, t=15, dropout=False, base=True)
    x, base = args["x"].reshape(3, 5, -1), args["base"].reshape(3, 5, -1)

    def f(x, base):
        return adapter(x, None, *list(args.values())[2:7], base, *list(args.values())[8:], "torch", True)[0]

    gm = make_fx(f)(x, base)
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.amole.adapter.default) == 1
    out = gm(x, base)
    assert out.shape == (3, 5, base.shape[-1])
    torch.testing.assert_close(out, f(x, base), rtol=0, atol=0)


def _node_types(t: torch.Tensor) -> collections.Counter:
    seen, stack, types = set(), [t.grad_fn], collections.Counter()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        types[type(fn).__name__] += 1
        stack.extend(f for f, _ in fn.next_functions)
    return types


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_site_records_one_autograd_node(dropout):
    """An adapted projection on [B, S, D] adds one node to the frozen projection's autograd graph (the op's, which
    takes the projection's output as its base) and one AccumulateGrad per parameter: no view, cast or add. (A
    plain frozen nn.Linear folds into the op instead: `tests/model/test_projection.py`; a forward hook on it
    keeps it a module of its own, as here.)"""
    lin = torch.nn.Linear(24, 20).requires_grad_(False)
    lin.register_forward_hook(lambda m, args, out: None)
    site = AdaMoLELinear(lin, ("q",), (tuple(range(20)),), AdaMoLEConfig(num_experts=4, rank=2, dropout=dropout))
    x = torch.randn(3, 5, 24, requires_grad=True)
    extra = _node_types(site(x)) - _node_types(lin(x))
    assert extra == {"_EagerAdapterBackward": 1, "AccumulateGrad": 5}


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("lead", [(3, 5), ()])
def test_the_output_takes_an_in_place_add(kernels, lead):
    """The model may add into a projection's output in place (Falcon's MLP: `mlp_output += attention_output`).
    An eager call's output [..., O] is no view autograd would refuse that on (a view output of a multi-output
    Function), and the in-place add gives the values and every gradient of the out-of-place one."""
    args = make("adamole", e=4, r=4, t=math.prod(lead), dropout=True, base=True)
    g = torch.Generator().manual_seed(5)
    extra = torch.randn(*lead, args["base"].shape[-1], generator=g).to(DEVICE, args["x"].dtype)
    results = []
    for in_place in (True, False):
        shaped = _leaves(args, lead or None)
        out = adapter(*shaped.values(), kernels, True)[0]
        if in_place:
            out += extra
        else:
            out = out + extra
        ps = [shaped[k] for k in LEAVES if shaped[k] is not None]
        results.append((out, torch.autograd.grad(out.square().sum(), ps)))
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for name, a, b in zip([k for k in LEAVES if args[k] is not None], got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
