"""Second derivatives through the op raise; they are not silently wrong. The eager backward (both autograd nodes:
one site, `op._EagerAdapter`, and a folded projection, `op_linear._EagerLinearAdapter`) is the Triton kernels' or
the torch path's own formula over intermediates the forward saved, and its derivative left out what flows through
them: a Hessian-vector product was 15-60% off with no error (both paths, before). Gradients taken with
create_graph=True keep their values; differentiating them again, by `torch.autograd.grad` or `.backward()`, raises
naming the limit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from amole_compile import AdaMoLEConfig
from amole_compile.kernels import triton_usable
from amole_compile.model.projection import AdaMoLELinear

KERNELS = ["torch"] + (["triton"] if triton_usable(torch.zeros(1), explicit=True)[0] else [])


def _site(kernels: str, folded: bool) -> AdaMoLELinear:
    """One adapted projection with drawn adapter weights: folded (a plain frozen nn.Linear: one node with the
    projection) or not (a hook keeps the projection a module of its own: the op's node)."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 12).requires_grad_(False)
    if not folded:
        lin.register_forward_hook(lambda *args: None)
    site = AdaMoLELinear(lin, ("q",), (tuple(range(12)),),
                         AdaMoLEConfig(num_experts=2, rank=2, dropout=0.0, kernels=kernels))
    with torch.no_grad():
        for p in site.parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    return site


@pytest.mark.parametrize("folded", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize("kernels", KERNELS)
def test_a_second_derivative_raises(kernels, folded):
    site = _site(kernels, folded)
    params = [p for p in site.parameters() if p.requires_grad]
    x = torch.randn(2, 3, 16, requires_grad=True)
    plain = torch.autograd.grad(site(x).square().sum(), params)
    graphed = torch.autograd.grad(site(x).square().sum(), params, create_graph=True)
    for a, b in zip(graphed, plain, strict=True):  # first order: the same values
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(g.requires_grad for g in graphed)
    penalty = sum(g.square().sum() for g in graphed)
    with pytest.raises(RuntimeError, match="second derivative through the AdaMoLE op is not supported"):
        torch.autograd.grad(penalty, params, allow_unused=True)  # (allow_unused: no None in place of an error)
    graphed = torch.autograd.grad(site(x).square().sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative through the AdaMoLE op is not supported"):
        graphed[0].square().sum().backward()  # x's gradient too (an input-gradient penalty)
