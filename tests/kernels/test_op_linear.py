"""`kernels/op_linear.py`'s plan of a node (`_plan`): worked out once per meta and kernel choice, and worked out
again when the choice's inputs change (the AMOLE_KERNELS environment variable, x's dtype), so that a cached plan
never runs a node on kernels other than those asked for; and the node's autograd inputs (x and the parameters
only).

Legend: T tokens, D in features, O out features.
"""

from __future__ import annotations

import pytest
import torch

import amole_compile as ac
from amole_compile.kernels import op_linear, triton_usable
from amole_compile.model.projection import AdaMoLELinear

from models import build, ids

TRITON = triton_usable(torch.zeros(1), explicit=True)[0]


@pytest.fixture
def made(monkeypatch):
    """Counts `_make_plan` calls on a fresh plan cache."""
    calls = []
    make = op_linear._make_plan

    def counted(meta, x, **kw):
        calls.append(meta)
        return make(meta, x, **kw)

    monkeypatch.setattr(op_linear, "_PLANS", {})
    monkeypatch.setattr(op_linear, "_make_plan", counted)
    return calls


def _model(kernels="auto"):
    torch.manual_seed(0)
    return ac.transform(build("llama"), ac.AdaMoLEConfig(dropout=0.1, kernels=kernels))


def _triton_runs(env: str | None) -> list[bool]:
    """Whether each run of the cached plans made under AMOLE_KERNELS=`env` is on the Triton path."""
    return [r.triton for key, plan in op_linear._PLANS.items() if key[1] == env for r in plan.runs]


def test_a_plan_is_made_once_per_meta(made):
    """Calls after the first, and calls on other token counts, take the node's plan from the cache."""
    model = _model()
    model(input_ids=ids(2, 6)).logits.sum().backward()
    first = len(made)
    assert first == 2  # q | k | v linked in one node, o alone; every layer's nodes alike
    model(input_ids=ids(2, 6)).logits.sum().backward()
    model(input_ids=ids(3, 5)).logits.sum().backward()
    assert len(made) == first
    for proj in model.modules():
        if isinstance(proj, AdaMoLELinear):
            for site in proj.group.values():
                site.dropout = 0.0  # no keep-mask: another meta
    model(input_ids=ids(2, 6)).logits.sum().backward()
    assert len(made) == 2 * first


def test_plan_follows_the_environment(made, monkeypatch):
    """AMOLE_KERNELS=torch after a Triton run: the node runs on the torch path (a new plan), and back."""
    if not TRITON:
        pytest.skip("Triton is not usable here")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("AMOLE_KERNELS", raising=False)
    model = _model("triton")
    x = ids(2, 6)
    torch.manual_seed(1)
    model(input_ids=x).logits.sum().backward()
    assert _triton_runs(None) and all(_triton_runs(None))
    monkeypatch.setenv("AMOLE_KERNELS", "torch")
    model(input_ids=x).logits.sum().backward()
    assert _triton_runs("torch") and not any(_triton_runs("torch"))
    monkeypatch.delenv("AMOLE_KERNELS")
    n = len(made)
    model(input_ids=x).logits.sum().backward()  # the Triton plans again: from the cache, not made anew
    assert len(made) == n


def test_plan_key_holds_the_choice_inputs(monkeypatch):
    """Two calls that differ only in AMOLE_KERNELS or x's dtype get plans of their own."""
    monkeypatch.setattr(op_linear, "_PLANS", {})
    meta = (((8,), (("adamole", 2, 1, 1.0, 0.5, 1.0, "auto", False, 4, True, False, False),)),)
    x = torch.zeros(3, 4)
    a = op_linear._plan(meta, x)
    assert op_linear._plan(meta, x) is a
    monkeypatch.setenv("AMOLE_KERNELS", "torch")
    b = op_linear._plan(meta, x)
    assert b is not a and not b.runs[0].triton
    op_linear._plan(meta, x.double())
    assert len(op_linear._PLANS) == 3


def test_frozen_tensors_are_not_autograd_inputs():
    """The folded node's autograd inputs are x and each site's five parameters: the projections' W and b and the
    keep-masks take no gradient and go outside them (each input costs host time per call). Its gradients are
    those of the unfolded path (tests/model/test_siblings.py), and W's version is still checked
    (tests/model/test_projection.py)."""
    model = _model().train()
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 6, q.in_features, requires_grad=True)  # [B, S, D]
    y = q(x)
    assert type(y.grad_fn).__name__ == "_EagerLinearAdapterBackward"
    sites = sum(len(p.group) for p in (q, model.model.layers[0].self_attn.k_proj,
                                       model.model.layers[0].self_attn.v_proj))
    assert sites == 3  # q, k and v linked in one node
    inputs = [f for f, _ in y.grad_fn.next_functions]
    assert len(inputs) == 1 + 5 * sites
    params = [t for proj in ("q_proj", "k_proj", "v_proj")
              for t in getattr(model.model.layers[0].self_attn, proj).group.parameters()]
    assert sum(f is not None for f in inputs) == 1 + len(params)  # x, and every parameter present
