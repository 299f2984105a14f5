"""A layer shared by several blocks (ALBERT's, or a hand-written loop over one block) runs each of its sites more
than once per forward. Each call adds its own aux term, as if each call were its own layer: the shared model's
aux loss, loss and gradients equal those of the same model unrolled into separate layers holding copies of the
shared weights (each shared gradient the sum of its copies'). A submodule called by itself, outside the model's
forward, keeps its last call's term and adds nothing up across calls.

Legend: B rows, S tokens, D hidden size.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn

import amole_compile as ac
from amole_compile.kernels import triton_usable
from amole_compile.model.modules import ExpertSet

from models import MATRIX, ids

KERNELS = ["torch"] + (["triton"] if triton_usable(torch.zeros(1), explicit=True)[0] else [])


def _config(kernels: str) -> ac.AdaMoLEConfig:
    return ac.AdaMoLEConfig(num_experts=3, rank=2, roles="all", aux_loss_coef=0.5, dropout=0.0,
                            kernels=kernels)


def _randomize(model: nn.Module) -> None:
    """Random adapter weights: B nonzero, and gates and thresholds that route the tokens differently."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _albert(groups: int) -> nn.Module:
    cfg = MATRIX["albert_shared"][0]()
    cfg.num_hidden_groups, cfg.num_hidden_layers = groups, 2
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return tf.AutoModel.from_config(cfg).train()


def _step(model: nn.Module, call) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-> (the output's aux loss, {trainable parameter: gradient}) of a loss over the output plus that aux."""
    h, aux = call(model)  # h [B, S, D]
    weights = torch.randn(h.shape, generator=torch.Generator().manual_seed(5))
    ((h * weights).sum() + aux).backward()
    return aux.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _folded(grads: dict[str, torch.Tensor], fold) -> dict[str, torch.Tensor]:
    """The unrolled model's gradients summed over the copies of each shared parameter (`fold`: unrolled name ->
    shared name)."""
    out: dict[str, torch.Tensor] = {}
    for name, g in grads.items():
        key = fold(name)
        out[key] = g.clone() if key not in out else out[key] + g
    return out


def _same_as_unrolled(shared: nn.Module, unrolled: nn.Module, fold, call) -> tuple[torch.Tensor, dict]:
    """Random adapter weights on `shared`, copied into `unrolled` (`fold`: unrolled name -> shared name); a step
    of each: the same aux loss, and each shared gradient the sum of its copies'. -> (aux, shared gradients)."""
    _randomize(shared)
    state = shared.state_dict()
    unrolled.load_state_dict({k: state[fold(k)] for k in unrolled.state_dict()})
    aux, grads = _step(shared, call)
    aux_u, grads_u = _step(unrolled, call)
    torch.testing.assert_close(aux, aux_u, rtol=1e-5, atol=0)
    folded = _folded(grads_u, fold)
    assert folded.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, folded[name], rtol=1e-4, atol=1e-5, msg=name)
    return aux, grads


@pytest.mark.parametrize("kernels", KERNELS)
def test_albert_adds_one_aux_term_per_call_of_its_shared_layer(kernels):
    shared = ac.transform(_albert(groups=1), _config(kernels))
    unrolled = ac.transform(_albert(groups=2), _config(kernels))
    x = ids(2, 7)

    def call(model):
        out = model(input_ids=x)
        return out.last_hidden_state, out.aux_loss

    aux, grads = _same_as_unrolled(shared, unrolled, lambda n: n.replace("albert_layer_groups.1.",
                                                                          "albert_layer_groups.0."), call)
    assert aux > 1.5  # two calls' terms (each is ~1 for E experts, at least 1 by Cauchy-Schwarz for adamole)
    torch.testing.assert_close(ac.aux_loss(shared).detach(), aux, rtol=0, atol=0)
    assert any("gate" in k for k in grads)


def test_compiled_albert_sums_its_calls_as_eager_does():
    """Under torch.compile(fullgraph=True) (dynamo compiles the loss hooks as frames of their own): the same aux
    loss as the eager forward (two calls' terms), no graph break, and nothing left open on the sites afterwards."""
    from torch._dynamo.utils import counters

    model = ac.transform(_albert(groups=1), _config("torch"))
    _randomize(model)
    x = ids(2, 7)
    eager = model(input_ids=x).aux_loss.detach()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        out = compiled(input_ids=x)
        out.aux_loss.backward()
        torch.testing.assert_close(out.aux_loss.detach(), eager, rtol=1e-6, atol=0)
    assert eager > 1.5 and not counters["graph_break"]
    sites = [m for m in model.modules() if isinstance(m, ExpertSet)]
    assert sites and not any(m._summing or m._fwd_aux is not None for m in sites)


class Block(nn.Module):
    """Attention-free mixing (q, k, v, o) and an MLP (up, down): a hand-written block with six projections."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, S, D]
        q, k, v = self.q(x), self.k(x), self.v(x)
        a = torch.softmax(q @ k.transpose(1, 2) / 4.0, -1) @ v
        x = x + self.o(a)
        return x + self.down(torch.relu(self.up(x)))


class Looped(nn.Module):
    """One block run `loops` times (weights shared across depth), or `loops` blocks each run once. With
    `no_grad_last`, the last run is under torch.no_grad(), and the output is a dict (which the loss hook gives
    the forward's `aux_loss`)."""

    def __init__(self, loops: int, shared: bool, no_grad_last: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(40, 16)
        self.blocks = nn.ModuleList([Block() for _ in range(1 if shared else loops)])
        self.loops, self.no_grad_last = loops, no_grad_last

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for i in range(self.loops):
            block = self.blocks[min(i, len(self.blocks) - 1)]
            if self.no_grad_last and i == self.loops - 1:
                with torch.no_grad():
                    x = block(x)
            else:
                x = block(x)
        return {"hidden": x} if self.no_grad_last else x


def _looped(loops: int, shared: bool, kernels: str, no_grad_last: bool = False) -> nn.Module:
    x = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1))
    model = ac.transform(Looped(loops, shared, no_grad_last), _config(kernels), example_inputs=(x,))
    return model.train()


def _fold_blocks(name: str) -> str:
    parts = name.split(".")
    return ".".join(["blocks", "0", *parts[2:]]) if parts[0] == "blocks" else name


def _looped_call(model):
    h = model(torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1)))
    return h, ac.aux_loss(model)


@pytest.mark.parametrize("kernels", KERNELS)
def test_a_hand_written_loop_over_one_block_sums_its_calls(kernels):
    aux, _ = _same_as_unrolled(_looped(3, True, kernels), _looped(3, False, kernels), _fold_blocks, _looped_call)
    assert aux > 2.5  # three calls' terms


def test_a_call_under_no_grad_keeps_the_earlier_calls_gradient():
    """The last of three runs under no_grad. The forward's `aux_loss` counts all three runs, and its gradient is
    the first two runs' (the sum is taken with gradients on: the no-grad run adds a constant, it does not cut the
    graph). `ac.aux_loss` keeps the two runs with gradients on (a run without gradients never replaces a trained
    one's term)."""
    model = _looped(3, True, "torch", no_grad_last=True)
    _randomize(model)
    two, three = _looped(2, True, "torch"), _looped(3, True, "torch")
    for m in (two, three):
        m.load_state_dict(model.state_dict())
    x = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1))
    out = model(x)
    out["aux_loss"].backward()
    for m in (two, three):
        m(x)
    torch.testing.assert_close(out["aux_loss"].detach(), ac.aux_loss(three).detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(ac.aux_loss(model), ac.aux_loss(two), rtol=1e-6, atol=0)
    ac.aux_loss(two).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    expected = {n: p.grad for n, p in two.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys() and any("gate" in n for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_block_called_by_itself_keeps_its_last_term():
    """Outside the model's forward no loss hook opens a sum: each call's term replaces the last."""
    model = _looped(2, True, "torch")
    _randomize(model)
    block = model.blocks[0]
    x1, x2 = (torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(s)) for s in (7, 8))
    block(x1)
    block(x2)
    last = ac.aux_loss(model)
    block(x2)
    torch.testing.assert_close(ac.aux_loss(model), last, rtol=0, atol=0)  # not 2x: nothing added up
