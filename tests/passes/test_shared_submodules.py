"""A submodule shared by several blocks (one activation or rotary instance handed to every layer, as OpenAI GPT's
`ACT_FNS` and many hand-written models do) comes out of plan and transform untouched: the capture's recording
wrappers are undone last first (`capture.unwrap_forwards`), so none stays behind replaying the outputs it cached
from the example inputs (found on openai-gpt: logits 0.02 off after `plan`, with no error).
"""

from __future__ import annotations

import torch
import transformers as tf
from torch import nn

import amole_compile as ac
from amole_compile.passes.capture import unwrap_forwards, wrap_forward

from models import VOCAB, ids

B, S, D, H = 2, 5, 16, 2
CFG = ac.AdaMoLEConfig(num_experts=2, rank=2, dropout=0.0)


class Scale(nn.Module):
    """A parameter-free module every block calls (a shared activation or rotary table)."""

    def forward(self, x):
        return torch.tanh(x) * 1.5


class Block(nn.Module):
    def __init__(self, shared: nn.Module):
        super().__init__()
        self.shared = shared  # the same instance in every block
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x):  # x [B, S, D]
        q, k, v = (p(x).view(B, S, H, D // H).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, S, D / H]
        x = x + self.o(a.transpose(1, 2).reshape(B, S, D))
        return x + self.down(self.shared(self.up(x)))


class SharedLM(nn.Module):
    """Its forward branches on values, so the model does not export whole and is captured block by block (the
    path that records each block's inputs through wrappers)."""

    def __init__(self, layers: int = 3):
        super().__init__()
        shared = Scale()
        self.emb = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(Block(shared) for _ in range(layers))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        for blk in self.blocks:
            x = blk(x) if x.abs().max() > 0 else x
        return self.head(x)


def _instance_forwards(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules(remove_duplicate=False) if "forward" in m.__dict__]


def test_unwrap_is_last_first():
    """Wrapped twice (two blocks hold it), unwrapped: the module's own forward again; an instance-level forward it
    had before is put back."""
    m = Scale()
    saved = [wrap_forward(m, lambda x: x + 1), wrap_forward(m, lambda x: x + 2)]
    unwrap_forwards(saved)
    assert "forward" not in m.__dict__
    own = m.__dict__["forward"] = lambda x: x * 3
    saved = [wrap_forward(m, lambda x: x + 1), wrap_forward(m, lambda x: x + 2)]
    unwrap_forwards(saved)
    assert m.__dict__["forward"] is own


def test_plan_and_transform_leave_a_shared_module_as_it_was():
    torch.manual_seed(0)
    model = SharedLM().eval()
    assert model.blocks[0].shared is model.blocks[2].shared
    x, other = ids(B, S, 0), ids(B, S, 1)  # other: the same shapes, new values (a cached output would show here)
    with torch.no_grad():
        ref, ref_other = model(x), model(other)
        plan = ac.plan(model, CFG, example_inputs=(x,))
        assert plan.report.blocks, "captured whole: the test must take the block path"
        assert _instance_forwards(model) == []
        torch.testing.assert_close(model(other), ref_other, rtol=0, atol=0)
        ac.transform(model, CFG, example_inputs=(x,))
        assert _instance_forwards(model) == []
        assert len(ac.targets(model)) == 3 * 4  # q, k, v, o of each block
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(other), ref_other, rtol=0, atol=1e-6)


def test_openai_gpt_keeps_its_outputs():
    """OpenAI GPT hands one activation instance (`ACT_FNS["gelu"]`) to every layer's MLP."""
    cfg = tf.OpenAIGPTConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16)
    torch.manual_seed(0)
    model = tf.OpenAIGPTLMHeadModel(cfg).eval()
    assert model.transformer.h[0].mlp.act is model.transformer.h[1].mlp.act
    x = ids(B, S, 2)
    with torch.no_grad():
        ref = model(input_ids=x).logits
        ac.transform(model, CFG)
        assert _instance_forwards(model) == []
        assert len(ac.targets(model)) == 2 * 2  # each layer: fused q | k | v, and o
        torch.testing.assert_close(model(input_ids=x).logits, ref, rtol=0, atol=1e-6)
