"""Graph rewrite: `transform(ExportedProgram)` and `transform(GraphModule)` insert one `amole::adapter` call per role
site, tag every inserted node with meta["amole"], compute the same logits as the nn.Module path for the same adapter
weights, and leave the GraphModule as it was when the pass fails.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import fx

import amole_compile as ac
from amole_compile.kernels import register, triton_usable
from amole_compile.model.state import adapter_state
from amole_compile.passes import insert_ops as insert_ops_mod

from models import build, ids

ADAPTER = register().adapter._opoverload  # torch.ops.amole.adapter.default
CFG = ac.AdaMoLEConfig(num_experts=4, rank=2, dropout=0.0)  # exported modules cannot be put in eval mode
KERNELS = ["torch"] + (["triton"] if triton_usable(torch.zeros(1), explicit=True)[0] else [])


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def exported(request):
    torch.manual_seed(0)
    model = build(request.param)
    ep = torch.export.export(model, (), {"input_ids": ids(), "use_cache": False}, strict=False)
    return request.param, model, ep


def run(gm, x):
    return gm(input_ids=x, use_cache=False).logits


def adapter_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ADAPTER]


def randomise(model):
    with torch.no_grad():
        for name, p in adapter_state(model).items():
            p.copy_(torch.randn_like(p) * (0.2 if name.endswith("lora_B") else 0.5))


@pytest.mark.parametrize("source", ["exported_program", "graph_module"])
def test_graph_path(exported, source):
    arch, model, ep = exported
    gm_in = ep.module()
    before = {n.name for n in gm_in.graph.nodes}  # ep.module() builds the same graph each time
    x = ids(2, 8, seed=4)
    base_logits = model(input_ids=x).logits
    gm = ac.transform(ep if source == "exported_program" else gm_in, CFG)
    assert isinstance(gm, fx.GraphModule)
    if source == "graph_module":
        assert gm is gm_in
    planned = ac.targets(gm)
    sites = [(t.module, r) for t in planned for r in t.roles]
    assert len(sites) == 8
    calls = adapter_nodes(gm)
    assert len(calls) == len(sites)  # one op call per role site
    assert sorted((n.meta["amole"]["module"], n.meta["amole"]["role"]) for n in calls) == sorted(sites)
    inserted = [n for n in gm.graph.nodes if n.name not in before]
    assert inserted and all("amole" in n.meta for n in inserted)
    assert {n.name for n in gm.graph.nodes if "amole" in n.meta} == {n.name for n in inserted}
    assert all(n.meta["amole"]["module"] in {t.module for t in planned} for n in inserted)
    # at init (B = 0) the graph computes the base model's logits
    assert torch.equal(run(gm, x), base_logits)
    # same adapter weights as the nn.Module path -> same logits
    nn_model = ac.transform(copy.deepcopy(model), CFG).eval()
    randomise(nn_model)
    ours, theirs = adapter_state(gm), adapter_state(nn_model)
    assert sorted(ours) == sorted(theirs) and len(ours) == 40
    with torch.no_grad():
        for k, v in theirs.items():
            assert ours[k].shape == v.shape
            ours[k].copy_(v)
    want = nn_model(input_ids=x).logits
    assert not torch.allclose(want, base_logits, atol=1e-3)
    torch.testing.assert_close(run(gm, x), want, rtol=0, atol=1e-6)


def test_graph_path_aux_loss_and_grads(exported):
    _, _, ep = exported
    gm = ac.transform(ep, CFG)
    run(gm, ids()).sum().backward()  # exported graph modules are in training mode: aux is recorded
    aux = ac.aux_loss(gm)
    assert aux.shape == () and aux.item() > 0
    state = adapter_state(gm)
    assert all(p.grad is not None for k, p in state.items() if k.endswith("lora_B"))


@pytest.mark.parametrize("kernels", KERNELS)
def test_graph_path_trains_under_autocast_as_the_module_path(exported, kernels):
    """A bf16 autocast training step (HF Trainer's bf16=True): the inserted op computes in the adapters' float32 as
    the module path does (before, the torch path's backward raised on mixed dtypes, and the kernels' output came
    back in bf16): the same logits and adapter gradients, in float32, up to bf16 noise of the base graph."""
    _, model, ep = exported
    config = dataclasses.replace(CFG, kernels=kernels)
    gm = ac.transform(copy.deepcopy(ep), config)
    nn_model = ac.transform(copy.deepcopy(model), config).eval()  # as exported: no base dropout
    randomise(nn_model)
    ours, theirs = adapter_state(gm), adapter_state(nn_model)
    with torch.no_grad():
        for k, v in theirs.items():
            ours[k].copy_(v)
    x = ids(2, 8, seed=4)
    results = []
    for m in (gm, nn_model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = run(m, x)
        logits.float().square().mean().backward()
        results.append(logits.detach().float())
    torch.testing.assert_close(results[0], results[1], rtol=2e-2, atol=2e-2)
    for k, p in theirs.items():
        g = ours[k].grad
        assert g is not None and g.dtype == torch.float32, k
        assert (g - p.grad).norm() <= 0.05 * p.grad.norm() + 1e-6, k


def test_untransform_graph_module(exported):
    _, _, ep = exported
    gm = ep.module()
    code = gm.code
    x = ids(2, 8, seed=6)
    ref = run(gm, x)
    ac.transform(gm, CFG)
    randomise(gm)
    assert gm.code != code and not torch.allclose(run(gm, x), ref)
    ac.untransform(gm)
    assert gm.code == code and not hasattr(gm, "_amole") and adapter_nodes(gm) == []
    assert torch.equal(run(gm, x), ref)


def test_transform_graph_module_twice_raises(exported):
    _, _, ep = exported
    gm = ac.transform(ep, CFG)
    code = gm.code
    with pytest.raises(ValueError, match="holds an adapter named 'default' already"):
        ac.transform(gm, CFG)
    with pytest.raises(ValueError, match="GraphModule holds one adapter"):
        ac.transform(gm, CFG, adapter_name="second")
    assert gm.code == code and len(adapter_nodes(gm)) == 8


def test_failure_in_the_pass_leaves_graph_module_as_it_was(exported, monkeypatch):
    _, _, ep = exported
    gm = ep.module()
    code = gm.code
    modules = [(n, type(m)) for n, m in gm.named_modules()]
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    x = ids(2, 8, seed=7)
    ref = run(gm, x)
    real, seen = insert_ops_mod._rewrite_call, []

    def flaky(*args, **kwargs):  # rewrite one call (mutating the graph), then fail
        if seen:
            raise RuntimeError("boom")
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(insert_ops_mod, "_rewrite_call", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        ac.transform(gm, CFG)
    assert seen == [1]
    assert gm.code == code
    assert [(n, type(m)) for n, m in gm.named_modules()] == modules and not hasattr(gm, "_amole")
    assert not any("amole" in n.meta for n in gm.graph.nodes)
    after = gm.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert torch.equal(run(gm, x), ref)
    monkeypatch.undo()
    ac.transform(gm, CFG)  # and it is not half-adapted: the pass runs cleanly afterwards
    assert len(adapter_nodes(gm)) == 8
