"""Sibling projections (`passes/find_siblings.py`, `AdaMoLELinear._fold_siblings`): projections called on the same
input (an attention block's q, k and v) computed in one autograd node by the first one called, the others' results
held for their own calls.

Checked against the same model unlinked: outputs, aux losses, statistics and gradients, in training (dropout on) and
eval, with gradient checkpointing, threads, copies and pickles; then each case where a held result must not be used
(x changed in place, another gradient mode, hooks, another active adapter) computes afresh, and the linking rules.

Legend: B rows, S tokens per row, D hidden size.
"""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import amole_compile as ac
from amole_compile.kernels import triton_usable
from amole_compile.model.modules import expert_sets
from amole_compile.model.projection import AdaMoLELinear
from amole_compile.model.state import projections
from amole_compile.passes.find_siblings import link_siblings

from models import build, ids

KERNELS = ["torch"] + (["triton"] if triton_usable(torch.zeros(1), explicit=True)[0] else [])


def _llama(kernels="torch", dropout=0.1, roles=("q", "k", "v", "o"), **kw):
    torch.manual_seed(0)
    model = ac.transform(build("llama"), ac.AdaMoLEConfig(dropout=dropout, kernels=kernels, roles=roles, **kw))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.2)
    return model


def _unlinked(model):
    """A copy of `model` with no sibling links (each projection computes alone)."""
    twin = copy.deepcopy(model)
    for _, h in projections(twin):
        h.__dict__.pop("_siblings", None)
    return twin


def _siblings(model) -> dict[str, tuple[str, ...]]:
    names = {id(h): n.rpartition(".")[2] for n, h in projections(model)}
    return {n: tuple(names[id(s)] for s in h.__dict__.get("_siblings", ())) for n, h in projections(model)}


def _step(model, x, seed=1, train=True):
    """-> (logits, summed aux, {param: grad}) of one forward + backward with the dropout masks drawn from `seed`."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    auxes = [s.aux.detach() for s in expert_sets(model) if s.aux is not None]
    return out.logits.detach(), auxes, grads


def _close(got, ref, exact_out=True):
    (lg, ag, gg), (lr, ar, gr) = got, ref
    torch.testing.assert_close(lg, lr, rtol=0 if exact_out else 1e-5, atol=0 if exact_out else 1e-6)
    assert len(ag) == len(ar) > 0
    for a, r in zip(ag, ar, strict=True):
        torch.testing.assert_close(a, r, rtol=0, atol=0)
    assert gg.keys() == gr.keys() and len(gg) > 0
    for n in gg:  # x's gradient is summed in another order: float32 rounding reaches the earlier layers
        torch.testing.assert_close(gg[n], gr[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_q_k_v_are_linked_and_o_is_not():
    model = _llama()
    links = _siblings(model)
    assert len(links) == 8
    for layer in (0, 1):
        for role in ("q", "k", "v"):
            assert links[f"model.layers.{layer}.self_attn.{role}_proj"] == ("q_proj", "k_proj", "v_proj")
        assert links[f"model.layers.{layer}.self_attn.o_proj"] == ()


@pytest.mark.parametrize("kernels", KERNELS)
def test_linked_training_step_equals_unlinked(kernels):
    model = _llama(kernels)
    x = ids()
    _close(_step(model, x), _step(_unlinked(model), x))


def test_one_node_for_q_k_v():
    """Per layer one folded node computes q, k and v (their x gradient summed inside), one computes o."""
    model = _llama().train()
    out = model(input_ids=ids()).logits
    seen, stack, nodes = set(), [out.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        nodes.append(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    assert nodes.count("_EagerLinearAdapterBackward") == 4  # 2 layers x (q k v, o)


def test_eval_statistics_and_aux_are_recorded_per_projection():
    model = _llama()
    twin = _unlinked(model)
    x = ids()
    for m in (model, twin):
        m.train()
        torch.manual_seed(3)
        m(input_ids=x, labels=x)
        m.eval()
        with torch.no_grad():
            m(input_ids=x)
    for (n, h), (_, t) in zip(projections(model), projections(twin), strict=True):
        for s, r in zip(h.group.values(), t.group.values(), strict=True):
            assert torch.equal(s.stat_selected, r.stat_selected) and int(s.stat_tokens) == 16, n
            torch.testing.assert_close(s._fwd_aux, r._fwd_aux, rtol=0, atol=0)


def test_gradient_checkpointing_equals_unlinked():
    model = _llama()
    twin = _unlinked(model)
    for m in (model, twin):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    x = ids()
    _close(_step(model, x), _step(twin, x))


def test_copies_and_pickles_link_their_own_projections():
    model = _llama()
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert _siblings(twin) == _siblings(model)
        mine = {id(h) for _, h in projections(twin)}
        assert all(id(s) in mine for _, h in projections(twin) for s in h.__dict__.get("_siblings", ()))
        x = ids()
        _close(_step(twin, x), _step(_unlinked(model), x))


def test_threads_hold_their_own_results():
    model = _llama(dropout=0.0).eval()
    xs = [ids(seed=i) for i in range(4)]
    with torch.no_grad():
        ref = [model(input_ids=x).logits for x in xs]
    out = [None] * 4

    def run(i):
        with torch.no_grad():
            for _ in range(5):
                out[i] = model(input_ids=xs[i]).logits

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(out, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


class _Attention(nn.Module):
    """Hand-written: q, k, v on x, with a hook between them where a test can change x or the mode."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.between = None

    def forward(self, x):
        q = self.q(x)
        if self.between is not None:
            self.between(x)
        k, v = self.k(x), self.v(x)
        a = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1)
        return self.o(a @ v)


def _hand(seed=0):
    torch.manual_seed(seed)
    model = _Attention()
    ac.transform(model, ac.AdaMoLEConfig(num_experts=2, rank=2, dropout=0.0), example_inputs=(torch.randn(2, 5, 16),))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.3)
    return model


def _ref(model, x, between=None):
    twin = _unlinked(model)
    twin.between = between
    return twin(x)


def test_hand_written_attention_equals_unlinked():
    model = _hand()
    assert list(_siblings(model).values()) == [("q", "k", "v")] * 3 + [()]
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(model(x), _ref(model, x), rtol=1e-6, atol=1e-6)


def test_x_changed_in_place_between_siblings_computes_afresh():
    model = _hand()
    x = torch.randn(2, 5, 16)
    model.between = lambda t: t.mul_(2.0)  # k and v see 2x; q's fold held them for x
    torch.testing.assert_close(model(x.clone()), _ref(model, x.clone(), lambda t: t.mul_(2.0)), rtol=1e-6, atol=1e-6)


def test_another_gradient_mode_computes_afresh():
    """k and v run without gradients after q's fold held them with gradients: computed afresh, so they carry
    no graph (a held result would have)."""
    model = _hand()
    x = torch.randn(2, 5, 16)
    outs = {}

    def k_forward(t, _f=model.k.forward):
        with torch.no_grad():
            outs["k"] = _f(t)
        return outs["k"]

    model.k.__dict__["forward"] = k_forward
    model(x)
    assert outs["k"].grad_fn is None
    model.k.__dict__.pop("forward")
    torch.testing.assert_close(outs["k"], _unlinked(model).k(x), rtol=1e-6, atol=1e-6)


def test_a_sibling_without_an_active_adapter_runs_alone():
    """Adapter "b" on q and v only, k holding only "a": with "b" active, q's fold takes v, and k runs its base
    layer (the projection itself) when called."""
    model = _hand()
    ac.transform(model, ac.AdaMoLEConfig(num_experts=2, rank=2, dropout=0.0, include=r"^(q|v)$"), adapter_name="b",
                 example_inputs=(torch.randn(2, 5, 16),))
    ac.set_active_adapter(model, "b")
    assert model.k.active is None and model.q.active == "b"
    folded = []
    model.q.__dict__["_fold_siblings"] = lambda *a, _f=model.q._fold_siblings: folded.append(_f(*a)) or folded[-1]
    x = torch.randn(2, 5, 16)
    got = model(x)
    assert folded and folded[0] is not None  # q and v in one op
    model.q.__dict__.pop("_fold_siblings")
    torch.testing.assert_close(got, _ref(model, x), rtol=1e-6, atol=1e-6)


def test_a_second_adapter_switched_between_siblings_computes_afresh():
    model = _hand()
    ac.transform(model, ac.AdaMoLEConfig(num_experts=2, rank=2, dropout=0.0), adapter_name="b",
                 example_inputs=(torch.randn(2, 5, 16),))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".b." in n and n.endswith("lora_B"):
                p.normal_(std=0.3)
    x = torch.randn(2, 5, 16)
    model.between = lambda _x: model.k.__setattr__("active", "default")  # k switches back after q ran with "b"
    got = model(x)
    twin = _unlinked(model)
    twin.k.active = "b"
    twin.between = lambda _x: twin.k.__setattr__("active", "default")
    torch.testing.assert_close(got, twin(x), rtol=1e-6, atol=1e-6)


def test_hooks_see_the_held_result_or_stop_the_fold():
    """A hook on k sees k's output (held or not); a hook on k's base layer makes k unfoldable: q's fold takes v
    only, and k computes alone."""
    for where in ("holder", "base layer"):
        model = _hand()
        seen = []
        target = model.k if where == "holder" else model.k.base_layer
        target.register_forward_hook(lambda m, a, out, _seen=seen: _seen.append(out))
        x = torch.randn(2, 5, 16)
        got = model(x)
        assert len(seen) == 1
        want = _ref(model, x)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        if where == "holder":
            torch.testing.assert_close(seen[0], _unlinked(model).k(x), rtol=1e-6, atol=1e-6)


def test_linking_rules():
    """A projection called on its own anywhere, or twice on one tensor, or a holder that is not an
    AdaMoLELinear, is not linked; the links of an earlier rewrite are replaced."""
    model = _hand()
    holders = dict(projections(model))
    x, y = torch.randn(2, 16), torch.randn(2, 16)
    assert link_siblings(model, [("q", x), ("k", x), ("v", y)]) == [("q", "k")]  # v alone on y
    assert link_siblings(model, [("q", x), ("k", x), ("v", y), ("o", y)]) == [("q", "k"), ("v", "o")]
    assert holders["q"]._siblings == (holders["q"], holders["k"])
    assert link_siblings(model, [("q", x), ("k", x), ("q", y)]) == []  # q also called with y alone
    assert link_siblings(model, [("q", x), ("q", x), ("k", x)]) == []  # q twice on x
    assert link_siblings(model, [("q", x), ("o", y), ("k", x)]) == []  # not one after another
    assert all("_siblings" not in h.__dict__ for h in holders.values())
    assert isinstance(holders["q"], AdaMoLELinear)


class _CrossBlock(nn.Module):
    """A decoder block: q on the hidden states, k and v on the encoder's output `mem` (the same tensor in every
    block)."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, h, mem):
        a = torch.softmax(self.q(h) @ self.k(mem).transpose(-1, -2) / 4.0, -1)
        return h + self.o(a @ self.v(mem))


class _Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_CrossBlock(), _CrossBlock()])
        self.checkpointed = False

    def forward(self, h, mem):
        for block in self.blocks:
            h = checkpoint(block, h, mem, use_reentrant=False) if self.checkpointed else block(h, mem)
        return h


def test_cross_attention_links_each_block_and_checkpointing_equals_unlinked():
    """Every block's k and v read the same encoder output: each block's pair is linked, not all four (one set across
    blocks would draw block 1's dropout masks in block 0's forward, which the per-block recompute of activation
    checkpointing could not reproduce: wrong gradients, silently)."""
    torch.manual_seed(0)
    model = _Decoder()
    h, mem = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    ac.transform(model, ac.AdaMoLEConfig(num_experts=2, rank=2, dropout=0.3), example_inputs=(h, mem))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.3)
    links = {n: tuple(x.rpartition(".")[2] for x in v) for n, v in _named_siblings(model).items()}
    assert links == {f"blocks.{i}.{r}": ("k", "v") for i in (0, 1) for r in "kv"}
    twin = _unlinked(model)
    results = []
    for m in (model, twin):
        m.train()
        m.checkpointed = True
        torch.manual_seed(5)
        out = m(h, mem)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (out, grads), (ref, ref_grads) = results
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def _named_siblings(model) -> dict[str, tuple[str, ...]]:
    names = {id(h): n for n, h in projections(model)}
    return {n: tuple(names[id(s)] for s in h.__dict__["_siblings"]) for n, h in projections(model)
            if "_siblings" in h.__dict__}
