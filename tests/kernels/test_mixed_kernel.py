"""`kernels/mixed_torch.py`: a stack of adapters of different sizes and methods, each row of a batch running its
own slot, equals each adapter's torch path (`adapter_torch`) on that row, forward and gradients; the gathered
and the all-slots forms agree."""

from __future__ import annotations

import pytest
import torch

from amole_compile.kernels.adapter_torch import adapter_torch
from amole_compile.kernels.mixed_torch import SiteWeights, mixed_adapter, stack_sites

D, OUT = 13, 11  # odd widths
SPECS = [  # method, E, R, top_k, scale, cap
    ("adamole", 4, 2, 1, 2.0, 0.25),
    ("mole", 3, 4, 2, 0.5, 0.0),
    ("lora", 1, 3, 1, 1.5, 0.0),
    ("adamole", 2, 1, 1, 1.0, 0.9),
]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 6e-2, torch.float16: 8e-3}


def sites(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.7).to(dtype).requires_grad_()

    out = []
    for method, e, r, k, scale, cap in SPECS:
        gate = rand(e, D) if method != "lora" else None
        thr_w, thr_b = (rand(1, D), rand(1)) if method == "adamole" else (None, None)
        out.append(SiteWeights(rand(e * r, D), rand(OUT, e * r), gate, thr_w, thr_b, method, e, k, scale, cap, 0.0))
    return out


def alone(x, s: SiteWeights):
    """x [S, D] through one adapter's torch path -> delta [S, O]."""
    return adapter_torch(x, None, s.lora_a, s.lora_b, s.gate, s.thr_w, s.thr_b, None, s.method, s.num_experts,
                         s.top_k, s.scale, s.cap, 1.0)[0]


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("seq", [1, 7])
def test_rows_equal_each_adapter_alone_forward_and_gradients(dtype, seq):
    ws = sites(dtype)
    slot = torch.tensor([0, 1, 4, 2, 3, 0, 4])  # 4: no adapter
    x = torch.randn(len(slot), seq, D, dtype=dtype, generator=torch.Generator().manual_seed(1))
    st = stack_sites(ws)
    got, scores, mask = mixed_adapter(x, slot, st)
    fast, _, _ = mixed_adapter(x, slot, st, all_slots=True)
    want = torch.stack([alone(x[i], ws[j]) if j < len(ws) else x.new_zeros(seq, OUT) for i, j in enumerate(slot)])
    tol = TOL[dtype]
    assert (got - want).abs().max() <= tol and (fast - want).abs().max() <= tol
    assert mask[slot == 0][..., 4:].sum() == 0  # padded experts are never selected
    probe = torch.randn_like(want)
    grads = torch.autograd.grad((got * probe).sum(), [p for w in ws for p in w[:5] if p is not None])
    ref = torch.autograd.grad((want * probe).sum(), [p for w in ws for p in w[:5] if p is not None])
    for a, b in zip(grads, ref, strict=True):
        assert (a - b).abs().max() <= 10 * tol


def test_an_unused_slot_gets_zero_gradient():
    ws = sites(torch.float64)
    x = torch.randn(3, 5, D, dtype=torch.float64)
    delta, _, _ = mixed_adapter(x, torch.tensor([0, 0, 4]), stack_sites(ws))
    grads = torch.autograd.grad(delta.sum(), [ws[1].lora_a, ws[1].lora_b, ws[0].lora_b])
    assert not grads[0].any() and not grads[1].any() and grads[2].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_stack_of_one_method_routes_only_that_method(dtype):
    """Adapters all of one method take the shortcut (that method's routing alone); same numbers."""
    ws = [w for w in sites(dtype) if w.method == "adamole"]
    slot = torch.tensor([1, 2, 0, 1])  # 2: no adapter
    x = torch.randn(len(slot), 3, D, dtype=dtype, generator=torch.Generator().manual_seed(2))
    st = stack_sites(ws)
    assert st.methods == {"adamole"}
    got, _, mask = mixed_adapter(x, slot, st)
    want = torch.stack([alone(x[i], ws[j]) if j < len(ws) else x.new_zeros(3, OUT) for i, j in enumerate(slot)])
    assert (got - want).abs().max() <= TOL[dtype]
    assert mask[slot == 1][..., 2:].sum() == 0  # adapter 1 has 2 experts: the padded ones are never selected
