"""The site's aux loss as an autograd function (model/aux.py): the value and the router's gradient of the
formula of docs/math.md, E * sum_e mean_t(mask) * mean_t(scores), in fewer launches."""

from __future__ import annotations

import pytest
import torch

from amole_compile.model.aux import aux_loss


def reference(scores, mask, e):
    return e * (mask.to(scores.dtype).mean(0) * scores.mean(0)).sum()


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize(("t", "e"), [(1, 1), (7, 3), (64, 8), (33, 16)])
def test_value_and_gradient_equal_the_formula(dtype, tol, t, e):
    g = torch.Generator().manual_seed(t * 31 + e)
    scores = torch.softmax(torch.randn(t, e, generator=g, dtype=dtype), -1).requires_grad_()
    mask = torch.rand(t, e, generator=g) > 0.4
    got = aux_loss(scores, mask, e)
    want = reference(scores, mask, e)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    (gs_got,) = torch.autograd.grad(got * 1.7, scores)
    (gs_want,) = torch.autograd.grad(want * 1.7, scores)
    torch.testing.assert_close(gs_got, gs_want, rtol=tol, atol=tol)
    assert gs_got.shape == (t, e)


def test_gradcheck():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(5, 4, generator=g) > 0.5
    assert torch.autograd.gradcheck(lambda s: aux_loss(s, mask, 4), (scores,))


def test_compiled_equals_eager():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(9, 4, generator=g, requires_grad=True)
    mask = torch.rand(9, 4, generator=g) > 0.5
    compiled = torch.compile(aux_loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(scores, mask, 4), aux_loss(scores, mask, 4), rtol=1e-6, atol=1e-6)
