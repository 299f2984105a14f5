"""Property tests of the routing epilogue `_routing.route` / `route_backward`.

Legend: T tokens, E experts, Er router columns (E + 1 for adamole: gate logits then the threshold logit).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from amole_compile.kernels.routing_torch import route, route_backward

SETTINGS = settings(max_examples=80, deadline=None)
_elems = st.floats(-10, 10, allow_nan=False, allow_subnormal=False)


@st.composite
def adamole_case(draw, dtype=np.float64):
    e = draw(st.integers(1, 9))
    t = draw(st.integers(0, 12))
    zr = draw(hnp.arrays(dtype, (t, e + 1), elements=_elems))  # [T, E + 1]
    bias = draw(st.floats(-5, 5))
    cap = draw(st.one_of(st.just(1.0 / e), st.floats(0.01, 1.0)))
    return torch.from_numpy(zr), torch.tensor([bias], dtype=torch.from_numpy(zr).dtype), e, cap


@st.composite
def mole_case(draw, dtype=np.float64):
    e = draw(st.integers(1, 9))
    t = draw(st.integers(0, 12))
    zr = draw(hnp.arrays(dtype, (t, e), elements=_elems))  # [T, E]
    return torch.from_numpy(zr), e, draw(st.integers(1, e))


def _sum_tol(dtype):
    return 1e-12 if dtype == torch.float64 else 1e-6


def _check_common(w, mask, e, t, num=None):
    """`num` [T, E]: the weights' numerator when it can be zero on selected experts (adamole at an exact tie,
    a = p - tau = 0: selected, S = 0 -> 1, so the row's weights are all 0); rows with a positive S sum to 1."""
    assert w.shape == (t, e) and mask.shape == (t, e) and mask.dtype == torch.bool
    assert bool((w >= 0).all())
    assert bool((w[~mask] == 0).all())  # weights are zero wherever the mask is false
    rows = w.sum(-1)
    active = mask.any(-1) if num is None else (num * mask).sum(-1) > 0
    assert bool((rows[~active] == 0).all())
    assert torch.allclose(rows[active], torch.ones_like(rows[active]), rtol=0, atol=_sum_tol(w.dtype))


@SETTINGS
@given(adamole_case())
# a cancels to ~1e-3 (softmax 0.5 against tau ~0.499): its ~1e-16 rounding becomes ~1e-14 in a / S
@example((torch.tensor([[2e-4, 0.0, 1.0]], dtype=torch.float64), torch.tensor([5.0], dtype=torch.float64), 2, 0.5))
def test_adamole_route_properties(case):
    zr, b, e, cap = case
    w, scores, mask = route(zr, b, "adamole", e, 0, cap)
    t = zr.shape[0]
    _check_common(w, mask, e, t, num=scores)
    assert torch.equal(mask, scores >= 0)
    # scores are the shifted scores a = softmax(l) - cap * sigmoid(u + b)
    a = torch.softmax(zr[:, :e], -1) - cap * torch.sigmoid(zr[:, e:] + b)
    torch.testing.assert_close(scores, a, rtol=0, atol=1e-15)
    # where a > 0 strictly, the weight is positive; and the weights are the scores (a, checked above)
    # renormalised over the active set. Renormalising the test's own a instead would divide its rounding
    # (~1e-16) by S, which cancellation can make ~1e-3 (the example above): that measures conditioning, not route
    assert bool((w[scores > 0] > 0).all())
    s = (scores * mask).sum(-1, keepdim=True)
    expected = torch.where(s == 0, torch.zeros_like(scores),
                           scores * mask / torch.where(s == 0, torch.ones_like(s), s))
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-14)
    if cap <= 1.0 / e:  # at least one expert is always active
        assert bool(mask.any(-1).all())


@SETTINGS
@given(adamole_case(np.float32))
@example((torch.full((1, 7), 1e-5), torch.tensor([-1e-5]), 6, 1 / 3))  # a = 0 for all six experts: w = 0
def test_adamole_route_float32(case):
    zr, b, e, cap = case
    w, scores, mask = route(zr, b, "adamole", e, 0, cap)
    assert w.dtype == torch.float32 and scores.dtype == torch.float32
    _check_common(w, mask, e, zr.shape[0], num=scores)
    assert torch.equal(mask, scores >= 0)


def test_adamole_all_masked_rows_sum_to_zero():
    zr = torch.tensor([[0.1, 0.2, -0.3, 0.0, 30.0]], dtype=torch.float64)  # E = 4, threshold ~ 1.0
    w, scores, mask = route(zr, torch.zeros(1, dtype=torch.float64), "adamole", 4, 0, 1.0)
    assert not mask.any() and torch.equal(w, torch.zeros_like(w)) and bool((scores < 0).all())


def test_adamole_ge_not_gt_at_a_tie():
    # E = 2, equal logits: p = 0.5 each; cap = 1 and sigmoid(0) = 0.5 -> tau = 0.5 -> a = 0 exactly: active (>=)
    zr = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    w, scores, mask = route(zr, torch.zeros(1, dtype=torch.float64), "adamole", 2, 0, 1.0)
    assert torch.equal(scores, torch.zeros(1, 2, dtype=torch.float64)) and bool(mask.all())
    assert torch.equal(w, torch.zeros(1, 2, dtype=torch.float64))  # S == 0 -> S = 1 -> w = 0


@SETTINGS
@given(mole_case())
def test_mole_route_properties(case):
    zr, e, k = case
    w, scores, mask = route(zr, None, "mole", e, k, 0.0)
    t = zr.shape[0]
    _check_common(w, mask, e, t)
    assert torch.equal(mask.sum(-1), torch.full((t,), k))  # exactly k experts per token
    p = torch.softmax(zr, -1)
    torch.testing.assert_close(scores, p, rtol=0, atol=1e-15)
    # the picked experts have the k largest logits: every picked logit >= every unpicked one
    if k < e and t:
        lo = torch.where(mask, zr, torch.full_like(zr, np.inf)).min(-1).values
        hi = torch.where(mask, torch.full_like(zr, -np.inf), zr).max(-1).values
        assert bool((lo >= hi).all())
    assert bool((w[mask] > 0).all())
    torch.testing.assert_close(w, p * mask / (p * mask).sum(-1, keepdim=True), rtol=0, atol=1e-14)


@pytest.mark.parametrize("t", [0, 5])
def test_lora_route_is_one(t):
    w, scores, mask = route(torch.zeros(t, 0), None, "lora", 1, 0, 0.0)
    assert torch.equal(w, torch.ones(t, 1)) and torch.equal(scores, torch.ones(t, 1)) and bool(mask.all())
    gzr, gb = route_backward(torch.zeros(t, 0), None, torch.ones(t, 1), None, "lora", 1, 0, 0.0)
    assert gzr.shape == (t, 0) and gb.numel() == 0


# ---- backward against autograd on the same formula (float64) --------------------------------------

def _formula(zr, b, method, e, k, cap):
    """Differentiable (w, scores) written from docs/math.md; the masks carry no gradient."""
    if method == "adamole":
        a = torch.softmax(zr[:, :e], -1) - cap * torch.sigmoid(zr[:, e:] + b)
        m = (a >= 0).detach().to(a.dtype)
        num, scores = a * m, a
    else:
        p = torch.softmax(zr, -1)
        idx = torch.topk(zr.detach(), k, -1).indices
        m = torch.zeros_like(p).scatter(-1, idx, 1.0)
        num, scores = p * m, p
    s = num.sum(-1, keepdim=True)
    s = torch.where(s == 0, torch.ones_like(s), s)
    return num / s, scores


@st.composite
def backward_case(draw):
    method = draw(st.sampled_from(["adamole", "mole"]))
    e = draw(st.integers(1, 8))
    t = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    er = e + 1 if method == "adamole" else e
    zr = torch.randn(t, er, generator=g, dtype=torch.float64) * draw(st.floats(0.1, 4))
    b = torch.randn(1, generator=g, dtype=torch.float64)
    gw = torch.randn(t, e, generator=g, dtype=torch.float64)
    gs = torch.randn(t, e, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    k = draw(st.integers(1, e))
    cap = draw(st.one_of(st.just(1.0 / e), st.floats(0.05, 1.0)))
    return method, e, k, cap, zr, b, gw, gs


@settings(max_examples=120, deadline=None)
@given(backward_case())
def test_route_backward_matches_autograd(case):
    method, e, k, cap, zr, b, gw, gs = case
    if method == "mole":  # a tie at the k-th logit makes top-k ambiguous; random floats have none
        srt = zr.sort(-1, descending=True).values
        assume(k == e or bool((srt[:, k - 1] != srt[:, k]).all()))
    zr_ = zr.clone().requires_grad_(True)
    b_ = b.clone().requires_grad_(True)
    w, scores = _formula(zr_, b_, method, e, k, cap)
    w_fwd, s_fwd, _ = route(zr, b, method, e, k, cap)
    torch.testing.assert_close(w_fwd, w.detach(), rtol=0, atol=1e-13)
    torch.testing.assert_close(s_fwd, scores.detach(), rtol=0, atol=1e-13)
    loss = (w * gw).sum() + ((scores * gs).sum() if gs is not None else 0)
    inputs = (zr_, b_) if method == "adamole" else (zr_,)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    g_zr, g_b = route_backward(zr, b, gw, gs, method, e, k, cap)
    assert g_zr.shape == zr.shape and g_zr.dtype == torch.float64
    torch.testing.assert_close(g_zr, grads[0], rtol=1e-10, atol=1e-12)
    if method == "adamole":
        assert g_b.shape == (1,)
        torch.testing.assert_close(g_b, grads[1], rtol=1e-10, atol=1e-12)
    else:
        assert g_b.numel() == 0


def test_route_backward_reaches_threshold_through_s():
    """A case where only S links the threshold to the loss (one active expert has w = 1 whatever a is):
    then the gradient to the threshold logit is exactly 0, and with two active experts it is not."""
    zr = torch.tensor([[4.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # E = 3: one dominant expert
    b = torch.zeros(1, dtype=torch.float64)
    _, _, mask = route(zr, b, "adamole", 3, 0, 1 / 3)
    assert mask.tolist() == [[True, False, False]]
    g_zr, g_b = route_backward(zr, b, torch.randn(1, 3, dtype=torch.float64), None, "adamole", 3, 0, 1 / 3)
    assert g_zr[0, 3].item() == 0.0 and g_b.item() == 0.0
    zr2 = torch.tensor([[2.0, 2.0, -3.0, 0.0]], dtype=torch.float64)  # two active experts
    gw = torch.tensor([[1.0, -1.0, 0.5]], dtype=torch.float64)
    g_zr2, g_b2 = route_backward(zr2, b, gw, None, "adamole", 3, 0, 1 / 3)
    zr_ = zr2.clone().requires_grad_(True)
    w, _ = _formula(zr_, b, "adamole", 3, 0, 1 / 3)
    (ref,) = torch.autograd.grad((w * gw).sum(), zr_)
    torch.testing.assert_close(g_zr2, ref, rtol=1e-12, atol=1e-14)
