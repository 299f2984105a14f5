"""One state record per transformed model: nothing else of ours on the model, an undo stack that untransform
pops, copies (deepcopy, pickle, torch.save) that work at any point and are independent transformed models, no
autograd graph left on the modules beyond the aux loss, and the process-wide dynamo flag held while any
transformed model is alive."""

from __future__ import annotations

import copy
import gc
import io
import pickle

import pytest
import torch

import amole_compile as ac
from amole_compile.integrations.patches import PATCHES, DynamoFlag, _Bound
from amole_compile.model.modules import ExpertSet
from amole_compile.model.state import ATTR, state_of

from models import build, ids, logits

FLAG = DynamoFlag.NAME
CFG = ac.AdaMoLEConfig(dropout=0.0)


def _trained(arch="llama"):
    """A transformed model after a training step and then an eval forward under no_grad (the state in which
    copy.deepcopy used to raise)."""
    model = ac.transform(build(arch), CFG)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    model.train()
    x = ids(2, 8)
    model(input_ids=x, labels=x).loss.backward()
    model.eval()
    with torch.no_grad():
        model(input_ids=x)
    model.train()  # training mode, as a trainer holds it
    return model


def _sites(model):
    return [m for m in model.modules() if isinstance(m, ExpertSet)]


def test_deepcopy_after_a_training_forward_is_an_independent_transformed_model():
    model = _trained()
    assert ac.aux_loss(model).requires_grad  # the original keeps what aux_loss needs
    twin = copy.deepcopy(model)
    x = ids(2, 8, seed=3)
    model.eval(), twin.eval()
    assert torch.equal(logits(twin, x), logits(model, x))
    assert state_of(twin) is not state_of(model) and state_of(twin).active == "default"
    assert float(ac.aux_loss(twin)) == 0.0  # a copy starts with no recorded aux
    assert isinstance(twin.__dict__["save_pretrained"], _Bound) and twin.save_pretrained.model is twin
    with torch.no_grad():  # the copy's adapters are its own
        next(p for n, p in twin.named_parameters() if n.endswith("lora_B")).add_(1.0)
    assert not torch.equal(logits(twin, x), logits(model, x))
    ac.untransform(twin)
    assert not ac.is_transformed(twin) and ATTR not in twin.__dict__
    assert ac.is_transformed(model) and "save_pretrained" in model.__dict__  # the original keeps its state
    model.train()
    out = model(input_ids=x, labels=x)  # and its hooks: the aux still reaches the loss
    assert out.aux_loss is not None and out.aux_loss.requires_grad


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickle_and_torch_save_of_a_transformed_model(how):
    model = _trained()
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(model))
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
    x = ids(2, 8, seed=4)
    model.eval(), loaded.eval()
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert [n for n, _ in state_of(loaded).undo] == [n for n, _ in state_of(model).undo]
    assert loaded.save_pretrained.model is loaded
    ac.untransform(loaded)
    assert not ac.is_transformed(loaded) and ATTR not in loaded.__dict__


def test_no_autograd_graph_stays_on_the_modules_beyond_the_aux_loss():
    model = ac.transform(build("llama"), CFG).train()
    x = ids(2, 8)
    model(input_ids=x, labels=x).loss.backward()
    sites = _sites(model)
    assert all(s._fwd_aux is None for s in sites)  # the per-forward values were summed and dropped
    assert all(s._aux is not None and s._aux.grad_fn is not None for s in sites)  # aux_loss's
    with torch.no_grad():
        model(input_ids=x, labels=x)
    assert all(s._fwd_aux is None for s in sites)
    model.eval()
    model(input_ids=x)  # an eval forward with gradients on forgets the training aux
    assert all(s._aux is None for s in sites)
    assert float(ac.aux_loss(model)) == 0.0


def _ours(model):
    """What of ours is on the model object itself: its __dict__ entries and hooks."""
    hooks = {k: list(getattr(model, k).values()) for k in ("_forward_pre_hooks", "_forward_hooks",
                                                           "_load_state_dict_pre_hooks")}
    return set(model.__dict__), hooks


def test_one_record_under_one_attribute_and_untransform_pops_it_all():
    model = build("llama")
    keys, hooks = _ours(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ac.transform(model, CFG)
    record = state_of(model)
    installed = [n for n, _ in record.undo]
    assert installed[:4] == ["aux_loss_hooks", "resume_hook", "save_pretrained", "enable_input_require_grads"]
    assert set(installed) <= {p.name for p in PATCHES}
    new = set(model.__dict__) - keys
    assert new == {ATTR, "save_pretrained", "enable_input_require_grads"}, new  # the record + the overrides
    assert not [k for k in model.__dict__ if k.startswith("_amole") and k != ATTR]
    for name in ("a", "b"):
        ac.transform(model, ac.AdaMoLEConfig(method="lora"), adapter_name=name)
    assert [n for n, _ in state_of(model).undo] == installed  # installed once, whatever the adapters
    ac.untransform(model)
    assert _ours(model) == (keys, hooks)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.fixture
def fresh_flag(monkeypatch):
    """The dynamo flag's registry as if no model were transformed, the flag off; restored after."""
    cfg = torch._dynamo.config
    monkeypatch.setattr(DynamoFlag, "_live", {})
    monkeypatch.setattr(DynamoFlag, "_saved", None)
    before = getattr(cfg, FLAG)
    setattr(cfg, FLAG, False)
    yield cfg
    setattr(cfg, FLAG, before)


def test_a_dropped_model_releases_the_dynamo_flag(fresh_flag):
    model = ac.transform(build("llama"), CFG)
    assert getattr(fresh_flag, FLAG) is True
    del model
    gc.collect()
    assert getattr(fresh_flag, FLAG) is False and DynamoFlag.holders() == 0


def test_a_copy_holds_the_dynamo_flag_like_the_original(fresh_flag):
    a = ac.transform(build("llama"), CFG)
    b = copy.deepcopy(a)
    assert DynamoFlag.holders() == 2
    ac.untransform(b)
    assert getattr(fresh_flag, FLAG) is True  # a still needs it
    c = pickle.loads(pickle.dumps(a))
    ac.untransform(a)
    assert getattr(fresh_flag, FLAG) is True  # c, unpickled, holds it
    ac.untransform(c)
    assert getattr(fresh_flag, FLAG) is False


def test_two_models_one_dropped_then_untransform_restores_the_flag(fresh_flag):
    a, b = ac.transform(build("llama"), CFG), ac.transform(build("gpt2"), CFG)
    del a
    gc.collect()
    assert getattr(fresh_flag, FLAG) is True
    ac.untransform(b)
    assert getattr(fresh_flag, FLAG) is False


def test_the_flag_is_set_again_when_someone_switched_it_off(fresh_flag):
    held = ac.transform(build("llama"), CFG)
    setattr(fresh_flag, FLAG, False)  # switched off by someone else while held
    other = ac.transform(build("llama"), CFG)
    assert getattr(fresh_flag, FLAG) is True
    ac.untransform(held), ac.untransform(other)
    assert getattr(fresh_flag, FLAG) is False  # back to the value before the first transform


def test_set_active_adapter_on_a_model_without_adapters_changes_nothing():
    model = build("llama")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="holds no AdaMoLE adapters"):
        ac.set_active_adapter(model, None)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
