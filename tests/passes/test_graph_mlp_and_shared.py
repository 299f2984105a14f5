"""The graph path (`insert_ops`) with feed-forward roles: the same targets as the nn.Module path, one op call per
role site, the same logits for the same adapter weights; and ALBERT, whose one layer serves every layer: its
projections are one target each, described as shared, and both paths compute the same numbers.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

import amole_compile as ac
from amole_compile.kernels import register
from amole_compile.model.state import adapter_state

from models import build, build_matrix, ids

ADAPTER = register().adapter._opoverload
ALL = ac.AdaMoLEConfig(roles="all", num_experts=2, rank=2, dropout=0.0)


def randomise(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(adapter_state(model).items()):
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if name.endswith("lora_B") else 0.5))


def both_paths(model, inputs):
    """-> (nn.Module path model, graph path GraphModule), transformed with ALL and the same adapter weights."""
    ep = torch.export.export(copy.deepcopy(model).eval(), (), inputs, strict=False)
    nn_model = ac.transform(copy.deepcopy(model), ALL).eval()
    randomise(nn_model)
    gm = ac.transform(ep, ALL)
    ours, theirs = adapter_state(gm), adapter_state(nn_model)
    assert sorted(ours) == sorted(theirs)
    with torch.no_grad():
        for k, v in theirs.items():
            ours[k].copy_(v)
    return nn_model, gm


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_graph_path_with_mlp_roles(arch):
    torch.manual_seed(0)
    model = build(arch).eval()
    x = ids(2, 8, seed=4)
    inputs = {"input_ids": x, "use_cache": False}
    base = model(**inputs).logits
    nn_model, gm = both_paths(model, inputs)
    want = sorted((t.module, t.roles, str(t.slices)) for t in ac.targets(nn_model))  # module order may differ
    assert sorted((t.module, t.roles, str(t.slices)) for t in ac.targets(gm)) == want
    assert {r for _, roles, _ in want for r in roles} == ({"q", "k", "v", "o", "up", "down"} if arch == "gpt2"
                                                          else {"q", "k", "v", "o", "gate", "up", "down"})
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ADAPTER]
    assert sorted((n.meta["amole"]["module"], n.meta["amole"]["role"]) for n in calls) == sorted(
        (m, r) for m, roles, _ in want for r in roles)
    expected = nn_model(**inputs).logits
    assert not torch.allclose(expected, base, atol=1e-3)
    torch.testing.assert_close(gm(**inputs).logits, expected, rtol=0, atol=1e-5)


def test_albert_shared_layer():
    """ALBERT: one layer's parameters for both layers: 2 attention sites, 6 targets (one each), said to be shared
    by 2 blocks; equal to the base at init; the nn.Module and graph paths agree with adapters on."""
    model = build_matrix("albert_shared").eval()
    inputs = {**ac.passes.capture.synthesize_inputs(model)}
    plan = ac.plan(model, ALL)
    assert plan.report.anchors == 2 and len(plan.targets) == 6
    prefix = "encoder.albert_layer_groups.0.albert_layers.0."
    assert [t.module for t in plan.targets] == [prefix + m for m in (
        "attention.query", "attention.key", "attention.value", "attention.dense", "ffn", "ffn_output")]
    text = plan.describe()
    assert "called 2 times: its 6 projection(s) are shared by 2 blocks" in text
    assert len(re.findall(r"shared by 2 blocks \(one adapter, trained by all\)", text)) == 6, text
    base = model(**inputs).last_hidden_state
    with torch.no_grad():
        fresh = ac.transform(copy.deepcopy(model), ALL, plan=plan)
        torch.testing.assert_close(fresh(**inputs).last_hidden_state, base, rtol=0, atol=1e-6)
    nn_model, gm = both_paths(model, inputs)
    graph_plan = ac.plan(torch.export.export(copy.deepcopy(model), (), inputs, strict=False).module(), ALL)
    assert graph_plan.report.shared == {t.module: 2 for t in plan.targets}
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ADAPTER]
    assert len(calls) == 2 * 6  # each shared target is called once per layer
    expected = nn_model(**inputs).last_hidden_state
    assert not torch.allclose(expected, base, atol=1e-3)
    torch.testing.assert_close(gm(**inputs).last_hidden_state, expected, rtol=0, atol=1e-5)


