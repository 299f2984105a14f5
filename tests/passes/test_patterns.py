"""Discovery on hand-written attention modules, one per pattern the dataflow walk must see through (issue 10's
table): each asserts the exact targets, roles and columns, that the transformed model equals the base at init,
that a training step changes only adapter parameters, and a save / load round trip.

Legend: B batch, S sequence, D model width, H heads, E head dim.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import amole_compile as ac

B, S, D, H = 2, 5, 16, 2
E = D // H
CFG = ac.AdaMoLEConfig(num_experts=2, rank=2, dropout=0.0)


def heads(t: torch.Tensor, e: int = E) -> torch.Tensor:
    """[B, S, H*e] -> [B, H, S, e]"""
    return t.view(t.shape[0], t.shape[1], -1, e).transpose(1, 2)


def merge(t: torch.Tensor) -> torch.Tensor:
    """[B, H, S, e] -> [B, S, H*e]"""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


class XWT(nn.Linear):
    """Falcon's FalconLinear: `x @ W.T + b`, not F.linear."""

    def forward(self, x):
        h = x @ self.weight.T
        return h if self.bias is None else h + self.bias


class Einsum(nn.Module):
    """Fused qkv written as x @ W.T; scores and values by einsum."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = XWT(D, 3 * D), XWT(D, D)

    def forward(self, x):
        q, k, v = (t.reshape(B, S, H, E) for t in self.qkv(x).chunk(3, -1))
        p = (torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(E)).softmax(-1)
        return self.o(torch.einsum("bhqk,bkhe->bqhe", p, v).reshape(B, S, D))


class BloomLike(nn.Module):
    """Per-head interleaved fused qkv (view + select), baddbmm scores, views around softmax, bmm values."""

    def __init__(self):
        super().__init__()
        self.query_key_value, self.dense = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        qkv = self.query_key_value(x).view(B, S, H, 3, E)
        q, k, v = (qkv[..., i, :].transpose(1, 2).reshape(B * H, S, E) for i in range(3))
        alibi = torch.zeros(B * H, 1, S)
        scores = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=1 / math.sqrt(E)).view(B, H, S, S)
        p = F.softmax(scores + torch.triu(torch.full((S, S), -1e4), 1), dim=-1).view(B * H, S, S)
        return self.dense(merge(torch.bmm(p, v).view(B, H, S, E)))


class Sinks(nn.Module):
    """GPT-OSS eager: a learned column concatenated to the scores, max subtracted, softmax, column sliced off."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.sinks = nn.Parameter(torch.randn(H))

    def forward(self, x):
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(E)
        combined = torch.cat([scores, self.sinks.reshape(1, -1, 1, 1).expand(B, -1, S, 1)], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = F.softmax(combined, dim=-1)[..., :-1]
        return self.o(merge(probs @ v))


class Clamped(nn.Module):
    """MPT / DBRX / OLMo clip_qkv: clamp the fused GQA qkv, and clamp_ q in place; repeat_interleave for GQA."""

    def __init__(self):
        super().__init__()
        self.Wqkv, self.out_proj = nn.Linear(D, 2 * D), nn.Linear(D, D)

    def forward(self, x):
        q, k, v = self.Wqkv(x).clamp(-2, 2).split([D, D // 2, D // 2], dim=-1)
        q = q.clone()
        q.clamp_(-1, 1)
        q, k, v = heads(q), heads(k).repeat_interleave(2, dim=1), heads(v).repeat_interleave(2, dim=1)
        return self.out_proj(merge(F.scaled_dot_product_attention(q, k, v, is_causal=True)))


class Gated(nn.Module):
    """Qwen3-Next: q_proj yields q and a gate per head; o_proj(attn * sigmoid(gate))."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, 2 * D), nn.Linear(D, D), nn.Linear(D, D)
        self.o_proj = nn.Linear(D, D)

    def forward(self, x):
        q, gate = self.q_proj(x).view(B, S, H, 2 * E).chunk(2, dim=-1)
        q = q.transpose(1, 2)
        out = merge(F.scaled_dot_product_attention(q, heads(self.k_proj(x)), heads(self.v_proj(x))))
        return self.o_proj(out * torch.sigmoid(gate.reshape(B, S, D)))


NOPE, ROPE, VE, RKV = 4, 4, 6, 8


class MLA(nn.Module):
    """DeepSeek-V2/V3: kv_b_proj feeds k (nope part) and v per head; the rope part of k comes from
    kv_a_proj_with_mqa; q and k are assembled with new_empty and in-place slice writes."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(D, H * (NOPE + ROPE))
        self.kv_a_proj_with_mqa = nn.Linear(D, RKV + ROPE)
        self.kv_a_layernorm = nn.LayerNorm(RKV)
        self.kv_b_proj = nn.Linear(RKV, H * (NOPE + VE))
        self.o_proj = nn.Linear(H * VE, D)

    def forward(self, x):
        q = heads(self.q_proj(x), NOPE + ROPE)
        q_nope, q_pe = q.split([NOPE, ROPE], dim=-1)
        ckv, k_pe = self.kv_a_proj_with_mqa(x).split([RKV, ROPE], dim=-1)
        k_pe = k_pe.view(B, 1, S, ROPE)
        kv = heads(self.kv_b_proj(self.kv_a_layernorm(ckv)), NOPE + VE)
        k_nope, v = kv.split([NOPE, VE], dim=-1)
        q_pe, k_pe = q_pe * 0.5, k_pe * 0.5  # stands for rotary
        query = k_pe.new_empty(B, H, S, NOPE + ROPE)
        query[..., :NOPE] = q_nope
        query[..., NOPE:] = q_pe
        key = k_pe.new_empty(B, H, S, NOPE + ROPE)
        key[..., :NOPE] = k_nope
        key[..., NOPE:] = k_pe
        return self.o_proj(merge(F.scaled_dot_product_attention(query, key, v, is_causal=True)))


class TypeAs(nn.Module):
    """Llama-4: a dtype-only argument (`type_as(probe)`) is not a data edge: the probe is not a projection of q."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o, self.probe = (nn.Linear(D, D) for _ in range(5))

    def forward(self, x):
        r = self.probe(x)
        q, k, v = heads(self.q(x)).type_as(r), heads(self.k(x)), heads(self.v(x))
        scores = (q @ k.transpose(-1, -2)).type_as(r) / math.sqrt(E)
        return self.o(merge(scores.softmax(-1).type_as(q) @ v)) + r


class MoE(nn.Module):
    """Experts with data-dependent Python dispatch (DBRX): torch.export of anything holding it fails."""

    def __init__(self, n: int = 3):
        super().__init__()
        self.router = nn.Linear(D, n, bias=False)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(n))

    def forward(self, x):
        flat = x.reshape(-1, D)
        top = self.router(flat).argmax(-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            idx = torch.where(top == e)[0]
            if idx.numel() == 0:
                continue
            out[idx] = expert(flat[idx])
        return out.view_as(x)


class MoEBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.moe = Sinks(), MoE()

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.moe(x)


class MoEModel(nn.Module):
    BLOCK = MoEBlock  # two of them, in a layer list

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(self.BLOCK() for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _per_head(width: int, lo: int, hi: int) -> tuple[int, ...]:
    """Columns [lo, hi) of each head's block of `width` columns."""
    return tuple(h * width + c for h in range(H) for c in range(lo, hi))


ALL = slice(0, D)
CASES = {
    "einsum_xwt": (Einsum, [("qkv", ("q", "k", "v"), (slice(0, 16), slice(16, 32), slice(32, 48))),
                            ("o", ("o",), (ALL,))]),
    "bloom_views": (BloomLike, [("query_key_value", ("q", "k", "v"),
                                 (_per_head(3 * E, 0, E), _per_head(3 * E, E, 2 * E), _per_head(3 * E, 2 * E, 3 * E))),
                                ("dense", ("o",), (ALL,))]),
    "sinks": (Sinks, [(n, (n,), (ALL,)) for n in "qkvo"]),
    "clamp": (Clamped, [("Wqkv", ("q", "k", "v"), (slice(0, 16), slice(16, 24), slice(24, 32))),
                        ("out_proj", ("o",), (ALL,))]),
    "gated": (Gated, [("q_proj", ("q",), (_per_head(2 * E, 0, E),)), ("k_proj", ("k",), (ALL,)),
                      ("v_proj", ("v",), (ALL,)), ("o_proj", ("o",), (ALL,))]),
    "mla": (MLA, [("q_proj", ("q",), (slice(0, H * (NOPE + ROPE)),)),
                  ("kv_a_proj_with_mqa", ("k",), (slice(RKV, RKV + ROPE),)),
                  ("kv_b_proj", ("k", "v"), (_per_head(NOPE + VE, 0, NOPE), _per_head(NOPE + VE, NOPE, NOPE + VE))),
                  ("o_proj", ("o",), (slice(0, D),))]),
    "type_as": (TypeAs, [(n, (n,), (ALL,)) for n in "qkvo"]),
    "moe_dispatch": (MoEModel, [(f"layers.{i}.attn.{n}", (n,), (ALL,)) for i in range(2) for n in "qkvo"]),
}


def _make(cls):
    torch.manual_seed(0)
    return cls().eval()


def _x():
    return torch.randn(B, S, D, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", sorted(CASES))
def test_pattern(case, tmp_path):
    cls, want = CASES[case]
    model, x = _make(cls), _x()
    ref = model(x)
    plan = ac.plan(model, CFG, example_inputs=(x,))
    assert [(t.module, t.roles, t.slices) for t in plan.targets] == want, plan.describe()

    # at init the adapted model is the base model
    ac.transform(model, CFG, example_inputs=(x,))
    assert [(t.module, t.roles, t.slices) for t in ac.targets(model)] == want
    torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)

    # one training step moves adapter parameters only
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.5)
    (model(x).pow(2).mean() + 1e-3 * ac.aux_loss(model)).backward()
    opt.step()
    model.eval()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".adapters." in n for n in changed), sorted(changed)[:5]
    roles = {n.split(".adapters.")[1].split(".")[1] for n in changed}
    assert roles == {r for _, rs, _ in want for r in rs}  # every role's lora_B got a gradient

    # save / load round trip onto a fresh base model
    out = model(x)
    ac.save_adapters(model, tmp_path / "a")
    fresh = _make(cls)
    ac.load_adapters(fresh, tmp_path / "a", example_inputs=(x,))
    torch.testing.assert_close(fresh(x), out, rtol=0, atol=0)


def test_moe_dispatch_captures_block_by_block():
    """The whole model does not export; each block is tried alone, then its children: the attention is found,
    the MoE (and each block holding it) is listed as not captured, with the reason."""
    model, x = _make(MoEModel), _x()
    with pytest.raises(ac.passes.capture.CaptureError):
        ac.passes.capture.capture(model, (x,))
    plan = ac.plan(model, CFG, example_inputs=(x,))
    assert plan.report.anchors == 2
    assert [(s.module, s.reason) for s in plan.report.skipped] == [
        ("layers.0", "not_captured"), ("layers.1", "not_captured"), ("layers.0.moe", "not_captured"),
        ("layers.1.moe", "not_captured")]
    assert "its submodules were captured instead" in plan.report.skipped[0].detail
    assert "layers.0.moe: not captured" in plan.describe()


def test_type_as_is_not_a_data_edge():
    plan = ac.plan(_make(TypeAs), CFG, example_inputs=(_x(),))
    assert "probe" not in {t.module for t in plan.targets}
    assert plan.report.skipped == []


class NoBlockFails(MoEModel):
    BLOCK = MoE


def test_every_block_fails_to_capture():
    model, x = _make(NoBlockFails), _x()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ac.passes.capture.CaptureError, match=r"NoBlockFails.*first block, layers\.0"):
        ac.transform(model, CFG, example_inputs=(x,))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not ac.core.is_transformed(model)
