"""Block-by-block capture finds attention-bearing blocks at any depth of nested module lists, replaying the
analysis of identical ones: a layer list whose layers do not export and hold a list of sub-blocks, a list of
lists (x-transformers style), and the two towers of a CLIP model.
"""

from __future__ import annotations

import torch
from test_mlp_structure import Block
from torch import nn

import amole_compile as ac

from models import build_matrix

B, S, D = 2, 5, 16  # as in test_mlp_structure
CFG = ac.AdaMoLEConfig(num_experts=2, rank=2, dropout=0.0)


class Attn(Block):
    """An attention sub-block (test_mlp_structure's, without a feed-forward)."""

    def ffn(self, x):
        return torch.zeros_like(x)


class Layer(nn.Module):
    """A list of sub-blocks, run under a data-dependent branch: the layer itself does not export."""

    def __init__(self):
        super().__init__()
        self.subs = nn.ModuleList([Attn(), Attn()])

    def forward(self, x):
        for sub in self.subs:
            x = sub(x) if x.abs().max() > 0 else x
        return x


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([Layer(), Layer()])
        self.stages = nn.ModuleList([nn.ModuleList([Attn(), Attn()]) for _ in range(2)])  # a list of lists

    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent: the whole model does not export either
            for layer in self.encoder.layers:
                x = layer(x)
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return x


def test_nested_lists():
    model = Nested()
    x = torch.randn(B, S, D)
    plan = ac.plan(model, CFG, example_inputs=(x,))
    blocks = [f"encoder.layers.{i}.subs.{j}" for i in (0, 1) for j in (0, 1)] + \
        [f"stages.{i}.{j}" for i in (0, 1) for j in (0, 1)]
    assert [t.module for t in plan.targets] == [f"{b}.{r}" for b in blocks for r in "qkvo"], plan.describe()
    assert plan.report.anchors == 8
    found = plan.report.blocks
    assert found["encoder.layers.0"].startswith("not captured; its submodules were captured instead")
    assert found["encoder.layers.0.subs.0"] == "1 attention site(s); roles q k v o; 0 skipped"
    assert found["encoder.layers.1.subs.1"].endswith("(analysis of encoder.layers.0.subs.0 replayed)")
    assert found["stages.1.1"].endswith("(analysis of encoder.layers.0.subs.0 replayed)")
    ref = model(x)
    ac.transform(model, CFG, example_inputs=(x,), plan=plan)
    assert torch.equal(model(x), ref)


def test_two_towers_block_by_block():
    """CLIP: the text and the vision tower's layers are blocks (found in both towers), identical ones replayed."""
    plan = ac.plan(build_matrix("clip"))
    found = plan.report.blocks
    for tower in ("text_model", "vision_model"):
        assert found[f"{tower}.encoder.layers.0"] == "1 attention site(s); roles q k v o; 0 skipped"
        assert found[f"{tower}.encoder.layers.1"].endswith(f"(analysis of {tower}.encoder.layers.0 replayed)")
    assert plan.report.anchors == 4
