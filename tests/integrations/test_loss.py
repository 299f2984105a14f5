"""The loss hooks (`integrations/loss.py`) walk the model once per eager forward: the forward hook reuses the
sites the pre-hook found, also when forwards nest or one raised, and the aux loss they sum is the same."""

from __future__ import annotations

import gc

import pytest
import torch

import amole_compile as ac
from amole_compile.integrations import loss
from amole_compile.model.modules import ExpertSet

from models import build, ids

CFG = ac.AdaMoLEConfig(num_experts=2, rank=2, aux_loss_coef=0.5)


class Boom(Exception):
    pass


@pytest.fixture
def walks(monkeypatch):
    """The models `expert_sets` walked, in order."""
    seen = []
    real = loss.expert_sets

    def counted(module):
        seen.append(module)
        return real(module)

    monkeypatch.setattr(loss, "expert_sets", counted)
    yield seen
    loss._WALKED.set(())


def summed_aux(model) -> torch.Tensor:
    return torch.stack([m.aux for m in model.modules() if isinstance(m, ExpertSet)]).sum()


def test_one_walk_per_forward_and_the_same_aux(walks):
    torch.manual_seed(0)
    model = ac.transform(build("llama"), CFG).train()
    x = ids(2, 6)
    walks.clear()  # (transform's own check forward walked it once)
    before = loss._WALKED.get()
    out = model(input_ids=x, labels=x)
    assert len(walks) == 1 and walks[0] is model
    torch.testing.assert_close(out.aux_loss, summed_aux(model), rtol=0, atol=0)
    assert loss._WALKED.get() == before


def test_a_forward_that_raised_leaves_no_stale_sites(walks):
    """The forward hook runs also when the forward raises: the entry goes, the sites' per-forward aux is
    cleared, and the next forward sums its own aux. An entry a forward left anyway (here: put there by hand, as
    a compiled forward that raised would) goes when an outer forward leaves, and a dead model's at once."""
    torch.manual_seed(0)
    model = ac.transform(build("llama"), CFG).train()
    x = ids(2, 6)
    before = loss._WALKED.get()

    def boom(*_):
        raise Boom

    handle = model.model.layers[1].register_forward_pre_hook(boom)
    with pytest.raises(Boom):
        model(input_ids=x, labels=x)
    handle.remove()
    assert loss._WALKED.get() == before
    assert all(m._fwd_aux is None for m in model.modules() if isinstance(m, ExpertSet))
    out = model(input_ids=x, labels=x)
    torch.testing.assert_close(out.aux_loss, summed_aux(model), rtol=0, atol=0)
    other = torch.nn.Linear(2, 2)  # another model
    loss._entering(model)
    loss._entering(other)  # never left
    assert loss._leaving(model) is not None and loss._WALKED.get() == before
    loss._entering(other)
    del other
    walks.clear()  # (the fixture held it)
    gc.collect()
    loss._entering(model)  # the dead model's entry goes
    assert [e[0]() for e in loss._WALKED.get()[len(before):]] == [model]
    loss._leaving(model)


def test_nested_forwards_each_sum_their_own_sites(walks):
    """Forwards of two transformed models, one inside the other: each forward hook sums its own model's sites,
    from the pre-hook's walk (the hooks called as torch calls them)."""
    torch.manual_seed(0)
    a, b = (ac.transform(build("llama"), CFG).train() for _ in range(2))
    x = ids(2, 6)
    walks.clear()
    before = loss._WALKED.get()
    loss.pre_forward(a, (), {"input_ids": x})
    loss.pre_forward(b, (), {"input_ids": x})
    out_b = b.model(input_ids=x)  # the inner models run: their sites record their aux
    out_a = a.model(input_ids=x)
    inner = loss.post_forward(b, (), {}, {"loss": out_b.last_hidden_state.sum()})
    outer = loss.post_forward(a, (), {}, {"loss": out_a.last_hidden_state.sum()})
    assert [id(m) for m in walks] == [id(a), id(b)] and loss._WALKED.get() == before
    torch.testing.assert_close(inner["aux_loss"], summed_aux(b), rtol=0, atol=0)
    torch.testing.assert_close(outer["aux_loss"], summed_aux(a), rtol=0, atol=0)


@pytest.mark.parametrize("return_dict", [True, False])
def test_an_aux_loss_without_gradient_warns(recwarn, return_dict):
    """Reentrant activation checkpointing runs the layers without gradients: the loss takes gradients, the aux
    term none, and the routers would train without load balancing; that warns, naming the fix. Non-reentrant
    checkpointing, none at all, and a training-mode forward under no_grad do not warn."""
    torch.manual_seed(0)
    x = ids(2, 6)

    def step(reentrant: bool | None, grad: bool = True) -> list:
        model = ac.transform(build("llama"), CFG).train()
        if reentrant is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        recwarn.clear()
        with torch.set_grad_enabled(grad):
            model(input_ids=x, labels=x, return_dict=return_dict)
        return [w for w in recwarn if issubclass(w.category, loss.AuxWithoutGradientWarning)]

    warned = step(reentrant=True)
    assert len(warned) == 1 and "use_reentrant': False" in str(warned[0].message)
    assert not step(reentrant=False) and not step(reentrant=None) and not step(reentrant=True, grad=False)


def test_frozen_routers_need_no_aux_gradient(recwarn):
    """Routers frozen by the user: an aux term without gradient takes nothing from them, and does not warn."""
    model = ac.transform(build("llama"), CFG).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    for site in model.modules():
        if isinstance(site, ExpertSet):
            site.gate.requires_grad_(False)
            site.threshold_weight.requires_grad_(False)
            site.threshold_bias.requires_grad_(False)
    x = ids(2, 6)
    model(input_ids=x, labels=x).loss.backward()
    assert not [w for w in recwarn if issubclass(w.category, loss.AuxWithoutGradientWarning)]
