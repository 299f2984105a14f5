"""No dead adapter (issue 22, item 6): a projection whose weight its parent reads, bare parameters, and modules
the model skips at run time are refused by name, the model left exactly as it was; nothing is adapted where it
would never run.

Legend: B batch, S sequence, D model width, H heads.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import amole_compile as ac
from amole_compile.passes.capture import probe_forward, record_block_inputs, synthesize_inputs

B, S, D, H = 2, 5, 16, 2
CFG = ac.AdaMoLEConfig(num_experts=2, rank=2, dropout=0.0)


def snapshot(model):
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "types": [(n, type(m)) for n, m in model.named_modules()],
            "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
            "training": [(n, m.training) for n, m in model.named_modules()],
            "dicts": [(n, sorted(vars(m))) for n, m in model.named_modules()]}


def assert_unchanged(model, snap):
    now = snapshot(model)
    assert {k: now[k] for k in ("types", "grad", "training", "dicts")} == \
        {k: snap[k] for k in ("types", "grad", "training", "dicts")}
    assert now["state"].keys() == snap["state"].keys()
    assert all(torch.equal(now["state"][k], v) for k, v in snap["state"].items())
    assert not ac.is_transformed(model)


def heads(t):
    return t.view(t.shape[0], t.shape[1], H, -1).transpose(1, 2)


def merge(t):
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


class FairseqStyle(nn.Module):
    """fairseq / OpenAI-CLIP: q, k, v, out projections held as nn.Linear, their weights handed to
    F.multi_head_attention_forward, which never calls them. x [S, B, D]."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        return F.multi_head_attention_forward(
            x, x, x, D, H, None, bias, None, None, False, 0.0, self.out_proj.weight, self.out_proj.bias,
            training=self.training, need_weights=False, use_separate_proj_weight=True,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight)[0]


class ParentReadsQ(nn.Module):
    """k, v and o are called; q's weight is read by the parent through F.linear."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        q = F.linear(x, self.q_proj.weight, self.q_proj.bias)
        out = F.scaled_dot_product_attention(heads(q), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.o_proj(merge(out))


class Bare(nn.Module):
    """Projections stored as bare parameters, used through F.linear."""

    def __init__(self):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Parameter(torch.randn(D, D) / 4) for _ in range(4))

    def forward(self, x):
        q, k, v = (heads(F.linear(x, w)) for w in (self.wq, self.wk, self.wv))
        return F.linear(merge(F.scaled_dot_product_attention(q, k, v)), self.wo)


class Outer(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.attn = inner

    def forward(self, x):
        return self.attn(x)


def _x(seq_first=False):
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(1))
    return x.transpose(0, 1).contiguous() if seq_first else x


@pytest.mark.parametrize("cls,seq_first,dead", [
    (FairseqStyle, True, ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"]),
    (ParentReadsQ, False, ["attn.q_proj"]),
])
def test_a_weight_read_by_the_parent_is_refused_by_name(cls, seq_first, dead):
    """The projection's own forward never runs: swapped, it would leave the output equal to the base and get
    no gradient. Refused, each named with why; the model is exactly as before; plan lists them as skipped."""
    model, x = Outer(cls()).eval(), _x(seq_first)
    snap, ref = snapshot(model), model(x)
    with pytest.raises(ac.DeadAdapterError) as info:
        ac.transform(model, CFG, example_inputs=(x,))
    msg = str(info.value)
    for name in dead:
        assert re.search(rf"{re.escape(name)} \(roles \w\): its weight is read by {cls.__name__}\.forward through "
                         r"linear, not by its own forward", msg), msg
    assert "exclude" in msg and "nothing was changed" in msg
    assert_unchanged(model, snap)
    assert torch.equal(model(x), ref)
    if cls is FairseqStyle:  # nothing adaptable: plan says why too
        with pytest.raises(ac.DeadAdapterError, match="attn.out_proj"):
            ac.plan(model, CFG, example_inputs=(x,))
        return
    plan = ac.plan(model, CFG, example_inputs=(x,))  # plan does not refuse: it reports
    assert [(s.module, s.reason, s.roles) for s in plan.report.skipped] == [("attn.q_proj", "read_outside", ("q",))]
    assert "skipped: attn.q_proj (roles q): its weight is read by" in plan.describe()
    ac.transform(model, ac.AdaMoLEConfig(exclude=r"q_proj", **_small()), example_inputs=(x,))  # the way out named
    assert [t.module for t in ac.targets(model)] == ["attn.k_proj", "attn.v_proj", "attn.o_proj"]


def _small():
    return dict(num_experts=2, rank=2, dropout=0.0)


def test_bare_parameters_are_found_and_refused_each_by_name():
    """Each parameter is its own projection (not q, k, v, o grouped under their module, which made the error
    say the architecture had only q); none can be swapped for a module."""
    model, x = Outer(Bare()).eval(), _x()
    snap = snapshot(model)
    with pytest.raises(ac.DeadAdapterError) as info:
        ac.transform(model, CFG, example_inputs=(x,))
    msg = str(info.value)
    for name, role in (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o")):
        assert f"attn.{name} (roles {role}): a bare parameter, read by Bare.forward through linear" in msg, msg
    assert "has ('q',)" not in msg and "shares all its columns" not in msg
    assert_unchanged(model, snap)
    with pytest.raises(ac.DeadAdapterError, match="attn.wo"):  # nothing adaptable: plan says why too
        ac.plan(model, CFG, example_inputs=(x,))


class FastPath(nn.Module):
    """Like torch's Transformer fast paths: without gradients the parent computes q from q_proj's weight
    itself. The capture (gradients on) sees q_proj called; at run time in inference it never is."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        q = self.q_proj(x) if torch.is_grad_enabled() else F.linear(x, self.q_proj.weight, self.q_proj.bias)
        out = F.scaled_dot_product_attention(heads(q), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.o_proj(merge(out))


def test_the_probe_refuses_a_module_the_model_skips_at_run_time():
    """Discovery and run time differ: a forward after the swap shows that q_proj's adapters never run."""
    model, x = Outer(FastPath()).eval(), _x()
    plan = ac.plan(model, CFG, example_inputs=(x,))
    assert [t.module for t in plan.targets] == ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"]
    snap = snapshot(model)
    with pytest.raises(ac.DeadAdapterError, match=r"adapters of 1 projection\(s\) did not run in a forward of the "
                                                  r"example inputs given(.|\n)*  attn\.q_proj\n(.|\n)*nothing was"):
        ac.transform(model, CFG, example_inputs=(x,))
    assert_unchanged(model, snap)
    with pytest.raises(ac.DeadAdapterError, match="attn.q_proj"):  # a given plan is checked the same way
        ac.transform(model, CFG, plan=plan, example_inputs=(x,))
    assert_unchanged(model, snap)


class SkipBiasLinear(nn.Linear):
    """Megatron's skip_bias_add: the forward returns (x Wᵀ, bias), the caller adds the bias."""

    def forward(self, x):
        return F.linear(x, self.weight), self.bias


class SkipBiasAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (SkipBiasLinear(D, D) for _ in range(4))

    def forward(self, x):
        q, k, v = (sum(m(x)) for m in (self.q, self.k, self.v))
        y, b = self.o(merge(F.scaled_dot_product_attention(heads(q), heads(k), heads(v))))
        return y + b


def test_a_projection_whose_forward_returns_no_tensor_is_refused_at_transform():
    """The plan finds q, k, v and o (their weights multiply x); the check forward sees their forward return a
    tuple, which an adapter cannot add to: transform refuses by name, the model as it was (before, transform
    succeeded and the first forward raised 'tuple' object has no attribute 'dtype')."""
    model, x = Outer(SkipBiasAttention()).eval(), _x()
    assert [t.module for t in ac.plan(model, CFG, example_inputs=(x,)).targets] == ["attn.q", "attn.k", "attn.v",
                                                                                    "attn.o"]
    snap, want = snapshot(model), model(x)
    with pytest.raises(ac.UnsupportedLayerError, match=r"cannot adapt attn\.q: its forward returns a tuple, not a "
                                                       r"tensor .*4 such projection\(s\)"):
        ac.transform(model, CFG, example_inputs=(x,))
    assert_unchanged(model, snap)
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_a_second_adapter_that_would_not_run_is_taken_back_alone():
    model, x = Outer(FastPath()).eval(), _x()
    ac.transform(model, ac.AdaMoLEConfig(exclude="q_proj", **_small()), example_inputs=(x,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    undo = list(ac.core.state_of(model).undo)
    with pytest.raises(ac.DeadAdapterError, match="attn.q_proj"):
        ac.transform(model, CFG, adapter_name="b", example_inputs=(x,))
    assert ac.adapter_names(model) == ["default"] and ac.core.active_adapter(model) == "default"
    assert model.state_dict().keys() == state.keys() and type(model.attn.q_proj) is nn.Linear
    assert ac.core.state_of(model).undo == undo
    assert [p.requires_grad for p in model.parameters()] == [".adapters." in n for n, _ in model.named_parameters()]


def test_the_probe_leaves_nothing_behind():
    """Fake tensors, eval mode without gradients; every module's own flag, the statistics and aux are as
    before, and no marker stays on the holders."""
    model, x = Outer(ParentReadsQ()), _x()
    model.train()
    model.attn.k_proj.eval()
    ac.transform(model, ac.AdaMoLEConfig(exclude="q_proj", **_small()), example_inputs=(x,))
    assert model.training and not model.attn.k_proj.training and model.attn.v_proj.training
    for _, holder in ac.model.state.projections(model):
        assert "add_to" not in vars(holder) and "add_role" not in vars(holder)
    assert all(int(s.stat_tokens) == 0 and s.aux is None for s in model.modules()
               if isinstance(s, ac.model.modules.ExpertSet))


def test_no_inputs_to_check_with_is_a_warning():
    """A plain module transformed with a plan and no example inputs: the adapters cannot be checked, and a
    warning says so (not an error: the plan was the user's)."""
    model, x = Outer(ParentReadsQ()).eval(), _x()
    plan = ac.plan(model, ac.AdaMoLEConfig(exclude="q_proj"), example_inputs=(x,))
    with pytest.warns(UserWarning, match="could not check that the adapters of Outer run.*example_inputs"):
        ac.transform(model, CFG, plan=plan)
    assert len(ac.targets(model)) == 3


def test_hf_models_are_checked_without_warnings():
    from models import build

    model = build("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ac.transform(model, CFG)
    assert len(ac.targets(model)) == 8


def test_module_stacks_of_a_block_capture_are_relative_to_the_block():
    """What reach.py reads: non-strict export fills nn_module_stack for a block captured alone too, with paths
    relative to the block (and the block itself as '')."""
    from models import build

    model = build("llama")
    block = model.model.layers[0]
    (args, kwargs), = record_block_inputs(model, [("b", block)], (), synthesize_inputs(model)).values()
    ep = torch.export.export(block, args, kwargs, strict=False)
    linear = next(n for n in ep.graph.nodes if n.op == "call_function" and "linear" in str(n.target))
    paths = [p for p, _ in linear.meta["nn_module_stack"].values()]
    assert paths == ["", "self_attn", "self_attn.q_proj"]


class TrainingOnlyRead(nn.Module):
    """Like Gemma3n's AltUp: in training mode the parent uses o_proj's weight itself (clamped), in eval mode it
    calls o_proj. Discovery and the eval-mode check see o_proj called; its adapter would change the eval output
    and never train. A BatchNorm and dropout make the training-mode forward change buffers and draw numbers."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D) for _ in range(4))
        self.norm, self.drop = nn.BatchNorm1d(D), nn.Dropout(0.5)

    def forward(self, x):
        x = self.drop(self.norm(x.transpose(1, 2)).transpose(1, 2))
        out = merge(F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)),
                                                   heads(self.v_proj(x))))
        if self.training:
            return F.linear(out, self.o_proj.weight.clamp(-10, 10), self.o_proj.bias)
        return self.o_proj(out)


class LayerDrop(nn.Module):
    """Like OPT's or fairseq's LayerDrop: in training mode the whole attention is skipped at random (here
    always). Neither called nor read there, its projections are not reported (o_proj's weight included)."""

    def __init__(self):
        super().__init__()
        self.inner = TrainingOnlyRead()

    def forward(self, x):
        return x if self.training else self.inner(x)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_weight_read_in_training_mode_only_is_refused(mode):
    model, x = Outer(TrainingOnlyRead()).train(mode == "train"), _x()
    plan = ac.plan(model, CFG, example_inputs=(x,))
    assert "attn.o_proj" in [t.module for t in plan.targets]
    snap = snapshot(model)
    with pytest.raises(ac.DeadAdapterError, match=r"adapters of 1 projection\(s\) did not run(.|\n)*'in training "
                                                  r"mode' would change the eval output and never train(.|\n)*"
                                                  r"  attn\.o_proj \(in training mode\)\n"):
        ac.transform(model, CFG, example_inputs=(x,))
    assert_unchanged(model, snap)  # the batch norm's statistics too
    ac.transform(model, ac.AdaMoLEConfig(exclude="o_proj", **_small()), example_inputs=(x,))
    assert [t.module for t in ac.targets(model)] == ["attn.q_proj", "attn.k_proj", "attn.v_proj"]


def test_layers_dropped_in_training_are_not_reported():
    model, x = Outer(LayerDrop()).eval(), _x()
    ac.transform(model, CFG, example_inputs=(x,))
    assert len(ac.targets(model)) == 4


@pytest.mark.parametrize("how", ["real", "fake"])
def test_a_training_mode_probe_keeps_buffers_and_random_state(how):
    model, x = Outer(TrainingOnlyRead()).eval(), _x()
    snap, rng = snapshot(model), torch.get_rng_state()
    assert probe_forward(model, (x,), {}, prefer=how, training=True) == how
    assert_unchanged(model, snap)
    assert torch.equal(torch.get_rng_state(), rng)
