"""Feed-forward roles by structure, on hand-written blocks whose activations are in no list: inline Mish, an
erf-based GELU, squared ReLU, SwiGLU written as `g.sigmoid() * g * u`, a fused gate_up with the gate second,
a router selecting with `max` (not top-k); and blocks that are not MLPs (no activation, a norm between the
projections, a bilinear product). Each asserts the exact targets, roles and columns.

Legend: B batch, S sequence, D model width, F hidden width of the MLP.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import amole_compile as ac

B, S, D, F_ = 2, 5, 16, 24
ALL = ac.AdaMoLEConfig(roles="all", num_experts=2, rank=2, dropout=0.0)


def mish(x):
    return x * torch.tanh(F.softplus(x))


def erf_gelu(x):
    return 0.5 * x * (1 + torch.special.erf(x / math.sqrt(2)))


def relu_squared(x):
    return F.relu(x) ** 2


class Block(nn.Module):
    """SDPA attention, then the feed-forward `ffn` (a method of the subclass), both residual."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        h = lambda t: t.view(B, S, 2, D // 2).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(h(self.q(x)), h(self.k(x)), h(self.v(x)))
        x = x + self.o(a.transpose(1, 2).reshape(B, S, D))
        return x + self.ffn(F.layer_norm(x, (D,)))


class TwoMatrix(Block):
    def __init__(self, act):
        super().__init__()
        self.act, self.fc1, self.fc2 = act, nn.Linear(D, F_), nn.Linear(F_, D)

    def ffn(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUInline(Block):
    """silu written out; the product's plain side comes first."""

    def __init__(self):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(D, F_, bias=False), nn.Linear(D, F_, bias=False), nn.Linear(F_, D)

    def ffn(self, x):
        g = self.w1(x)
        return self.w2(self.w3(x) * (g.sigmoid() * g))


class FusedGateSecond(Block):
    """One projection: the up half first, the gate half (erf GELU) second."""

    def __init__(self):
        super().__init__()
        self.wi, self.wo = nn.Linear(D, 2 * F_), nn.Linear(F_, D)

    def ffn(self, x):
        up, gate = self.wi(x).chunk(2, dim=-1)
        return self.wo(up * erf_gelu(gate))


class FusedWithAdapter(Block):
    """Zamba2: a fused gate_up projection plus a per-layer low-rank path of its own (D -> 4 -> 2F) added to it
    before the split. The low-rank path reads a narrower input than the hidden state: held fixed, not a side."""

    def __init__(self):
        super().__init__()
        self.wi, self.wo = nn.Linear(D, 2 * F_), nn.Linear(F_, D)
        self.lr_a, self.lr_b = nn.Linear(D, 4, bias=False), nn.Linear(4, 2 * F_, bias=False)

    def ffn(self, x):
        gate, up = (self.wi(x) + self.lr_b(self.lr_a(x))).chunk(2, dim=-1)
        return self.wo(F.gelu(gate) * up)


class ScaledUp(Block):
    """A gated MLP whose plain side is scaled and shifted (still affine: up), gate through squared ReLU."""

    def __init__(self):
        super().__init__()
        self.g, self.u, self.d = nn.Linear(D, F_), nn.Linear(D, F_), nn.Linear(F_, D)

    def ffn(self, x):
        return self.d(relu_squared(self.g(x)) * (0.5 * self.u(x) + 1.0))


class MaxRouted(Block):
    """Two dense two-matrix experts (Mish) and a router that picks one per token with `max` (an argmax)."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(D, 2, bias=False)
        self.ups, self.downs = nn.ModuleList(nn.Linear(D, F_) for _ in range(2)), \
            nn.ModuleList(nn.Linear(F_, D) for _ in range(2))

    def ffn(self, x):
        weight, pick = self.router(x).softmax(-1).max(-1)
        ys = torch.stack([d(mish(u(x))) for u, d in zip(self.ups, self.downs, strict=True)], -1)  # [B, S, D, 2]
        return weight[..., None] * ys.gather(-1, pick[..., None, None].expand(B, S, D, 1))[..., 0]


class NotMLPs(Block):
    """Projection pairs with no activation, with a norm between, and a bilinear product: none is an MLP."""

    def __init__(self):
        super().__init__()
        self.a1, self.a2 = nn.Linear(D, F_), nn.Linear(F_, D)
        self.n1, self.n2 = nn.Linear(D, F_), nn.Linear(F_, D)
        self.b1, self.b2, self.b3 = nn.Linear(D, F_), nn.Linear(D, F_), nn.Linear(F_, D)

    def ffn(self, x):
        low_rank = self.a2(self.a1(x) * 0.5)
        normed = self.n2(F.layer_norm(torch.tanh(self.n1(x)), (F_,)))
        return low_rank + normed + self.b3(self.b1(x) * self.b2(x))


def full(n):
    return tuple(range(n))


ATTN = [("q", {"q": full(D)}), ("k", {"k": full(D)}), ("v", {"v": full(D)}), ("o", {"o": full(D)})]
CASES = {
    "mish": (lambda: TwoMatrix(mish), [("fc1", {"up": full(F_)}), ("fc2", {"down": full(D)})]),
    "erf_gelu": (lambda: TwoMatrix(erf_gelu), [("fc1", {"up": full(F_)}), ("fc2", {"down": full(D)})]),
    "relu_squared": (lambda: TwoMatrix(relu_squared), [("fc1", {"up": full(F_)}), ("fc2", {"down": full(D)})]),
    "swiglu_inline": (SwiGLUInline, [("w1", {"gate": full(F_)}), ("w3", {"up": full(F_)}),
                                     ("w2", {"down": full(D)})]),
    "fused_gate_second": (FusedGateSecond, [("wi", {"gate": tuple(range(F_, 2 * F_)), "up": full(F_)}),
                                            ("wo", {"down": full(D)})]),
    "fused_with_adapter": (FusedWithAdapter, [("wi", {"gate": full(F_), "up": tuple(range(F_, 2 * F_))}),
                                              ("wo", {"down": full(D)})]),
    "scaled_up": (ScaledUp, [("g", {"gate": full(F_)}), ("u", {"up": full(F_)}), ("d", {"down": full(D)})]),
    "max_routed": (MaxRouted, [("ups.0", {"up": full(F_)}), ("downs.0", {"down": full(D)}),
                               ("ups.1", {"up": full(F_)}), ("downs.1", {"down": full(D)})]),
}


def found(plan):
    return [(t.module, {r: t.columns(r) for r in t.roles}) for t in plan.targets]


def x_():
    return torch.randn(B, S, D, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("case", sorted(CASES))
def test_feed_forward_by_structure(case):
    make, want = CASES[case]
    model = make()
    plan = ac.plan(model, ALL, example_inputs=(x_(),))
    assert found(plan) == ATTN + want, plan.describe()
    if case == "max_routed":
        assert "router: an MoE router" in "\n".join(map(str, plan.report.skipped))
    ref = model(x_())
    ac.transform(model, ALL, example_inputs=(x_(),))
    torch.testing.assert_close(model(x_()), ref, rtol=0, atol=1e-6)


def test_not_mlps():
    with pytest.raises(ValueError, match=r"NotMLPs: roles \('gate', 'up', 'down'\) were asked for, but "
                                         r"only \('q', 'k', 'v', 'o'\) were found; no feed-forward block was found"):
        ac.plan(NotMLPs(), ALL, example_inputs=(x_(),))


class WithCoefficients(TwoMatrix):
    """A Mish MLP, and beside it a pair like Gemma3n's AltUp coefficients: D -> 4 -> tanh -> 9, the 9 outputs
    mixing three copies of the hidden state. The pair has an activation but does not map the hidden state back to
    its width: not a feed-forward."""

    def __init__(self):
        super().__init__(mish)
        self.router, self.coefs = nn.Linear(D, 4, bias=False), nn.Linear(4, 9, bias=False)

    def ffn(self, x):
        c = self.coefs(torch.tanh(self.router(x))).view(B, S, 3, 3)  # [B, S, 3, 3]
        copies = torch.stack([x, 2 * x, -x], -1)  # [B, S, D, 3]
        mixed = (copies[..., None, :] * c[:, :, None]).sum(-1).mean(-1)  # [B, S, D]
        return super().ffn(x) + mixed


def test_coefficient_pairs_are_not_feed_forwards():
    model = WithCoefficients()
    plan = ac.plan(model, ALL, example_inputs=(x_(),))
    assert found(plan) == ATTN + [("fc1", {"up": full(F_)}), ("fc2", {"down": full(D)})], plan.describe()


class MaskedRows(TwoMatrix):
    """X-MOD's language adapters: the MLP runs on the rows a mask picks (a size that depends on values)."""

    def __init__(self):
        super().__init__(mish)

    def ffn(self, x):
        out = torch.zeros_like(x)
        keep = x[..., 0] > 0  # [B, S]
        out[keep] = super().ffn(x[keep])
        return out


def test_an_mlp_the_probe_cannot_run_is_named_not_dropped():
    with pytest.raises(ValueError, match=r"only \('q', 'k', 'v', 'o'\) were found \(skipped: fc2: fed by fc1, "
                                         r"through ops that could not be probed \(.*depends on values.*\): not "
                                         r"known to be a feed-forward's\)"):
        ac.plan(MaskedRows(), ALL, example_inputs=(x_(),))


class GatedStack(nn.Module):
    """No attention at all: residual gated MLPs (an MLP-Mixer's channel blocks, a state-space model's MLPs)."""

    def __init__(self, gated=True):
        super().__init__()
        self.gated = gated
        self.layers = nn.ModuleList(nn.ModuleDict(dict(g=nn.Linear(D, F_), u=nn.Linear(D, F_), d=nn.Linear(F_, D)))
                                    for _ in range(2))

    def forward(self, x):
        for m in self.layers:
            h = F.silu(m["g"](x)) * m["u"](x) if self.gated else m["g"](x) * m["u"](x)  # else bilinear: no MLP
            x = x + m["d"](h)
        return x


def test_feed_forward_roles_on_a_model_without_attention():
    """Feed-forward roles alone need no attention (NoAttentionFound was raised before the feed-forwards were
    looked at); attention roles still raise it, and no feed-forward found says what one looks like."""
    mlp = ac.AdaMoLEConfig(roles="mlp", num_experts=2, rank=2, dropout=0.0)
    model = GatedStack()
    plan = ac.plan(model, mlp, example_inputs=(x_(),))
    assert found(plan) == [(f"layers.{i}.{m}", {r: full(F_ if m != "d" else D)})
                           for i in range(2) for m, r in (("g", "gate"), ("u", "up"), ("d", "down"))]
    ref = model(x_())
    ac.transform(model, mlp, example_inputs=(x_(),))
    torch.testing.assert_close(model(x_()), ref, rtol=0, atol=1e-6)
    with pytest.raises(ac.NoAttentionFound, match="no attention found in GatedStack"):
        ac.plan(GatedStack(), ALL, example_inputs=(x_(),))
    with pytest.raises(ValueError, match=r"GatedStack: roles \('gate', 'up', 'down'\) were asked for, but none was "
                                         r"found; no feed-forward block was found"):
        ac.plan(GatedStack(gated=False), mlp, example_inputs=(x_(),))
