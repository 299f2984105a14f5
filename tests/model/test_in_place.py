"""A model may write into a projection's output in place: `q *= scale`, a residual `o += x`, `u.relu_()`. Each
way a projection computes (folded with its q / k / v siblings in one node, folded alone, or as itself when a hook
keeps it unfolded; on the torch path and the kernels) hands back an output autograd lets it modify, and the
in-place model trains exactly as the same model written out of place. (Falcon's MLP does `mlp_output +=
attention_output`: `test_training_matrix.py` trains it.)

Legend: B rows, S tokens, D hidden size.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import amole_compile as ac
from amole_compile.kernels import triton_usable

KERNELS = ["torch"] + (["triton"] if triton_usable(torch.zeros(1), explicit=True)[0] else [])


class Block(nn.Module):
    """Attention and an MLP whose projections' outputs are modified in place (`in_place`) or not."""

    def __init__(self, d: int = 32, heads: int = 4, in_place: bool = True) -> None:
        super().__init__()
        self.heads, self.in_place = heads, in_place
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, S, D]
        b, s, d = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)

        def heads(t):  # [B, S, D] -> [B, H, S, D / H]
            return t.view(b, s, self.heads, -1).transpose(1, 2)

        if self.in_place:
            q *= d ** -0.5
        else:
            q = q * d ** -0.5
        a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True, scale=1.0)
        o = self.o(a.transpose(1, 2).reshape(b, s, d))
        if self.in_place:
            o += x
            u = self.up(o)
            u.relu_()
            out = self.down(u)
            out.add_(o)
            return out
        o = o + x
        return self.down(self.up(o).relu()) + o


class Net(nn.Module):
    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.blocks = nn.ModuleList([Block(in_place=in_place) for _ in range(2)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return x


def _step(in_place: bool, kernels: str, hooked: bool):
    """-> (output, {parameter: gradient}) of one training step of the transformed Net."""
    torch.manual_seed(0)
    net = Net(in_place)
    if hooked:  # a hook keeps each projection a module of its own: the unfolded op
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.register_forward_hook(lambda *args: None)
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    model = ac.transform(net, ac.AdaMoLEConfig(num_experts=2, rank=2, dropout=0.1, roles="all", kernels=kernels),
                         example_inputs=(ids,))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.2)
    model.train()
    torch.manual_seed(2)  # the dropout masks
    out = model(ids)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("hooked", [False, True], ids=["folded", "unfolded"])
@pytest.mark.parametrize("kernels", KERNELS)
def test_in_place_writes_train_as_out_of_place(kernels, hooked):
    out, grads = _step(True, kernels, hooked)
    ref, ref_grads = _step(False, kernels, hooked)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) == 12 * 5  # 2 blocks x 6 projections x 5 parameters
    for name, g in grads.items():
        assert g is not None, name
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
