"""The kernels index their tensors in 32 bits: a call whose tokens would take an offset past 2^31 takes the torch
path, decided per call before any launch (one warning naming the limit; `kernels='triton'` raises), on every
eager path (a folded node of one site or of linked q, k, v; the unfolded op) and the registered op. Long-context
training reached it (an 8B model's down projection reads D = 14336: 150K tokens), where the offsets would have
wrapped into other rows without an error. The limit is patched small here, so that real calls cross it.

Legend: T tokens, D in features, O out features, G sites in one node.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import amole_compile as ac
from amole_compile.kernels import (
    adapter_triton,
    adapter_triton_bwd,
    backend,
    blocks,
    op,
    op_linear,
    triton_common,
    triton_usable,
)
from amole_compile.model.projection import AdaMoLELinear

TRITON = triton_usable(torch.zeros(1), explicit=True)[0]
needs_triton = pytest.mark.skipif(not TRITON, reason="Triton is not usable here")


def test_the_limit_names_no_tokens():
    assert blocks.max_tokens(8192, 3, 32) == 87381  # q, k, v at D = O = 8192 (a 70B model)
    assert blocks.index_unfit(65536, 8192, 8192, 3, 32) == ""
    why = blocks.index_unfit(131072, 8192, 8192, 3, 32)
    assert "at most 87381 tokens" in why and why == blocks.index_unfit(10**6, 8192, 8192, 3, 32)
    assert blocks.index_unfit(131072, 14336, 4096, 1, 32) == ""  # an 8B model's down projection: up to 149796
    assert "at most 149796 tokens" in blocks.index_unfit(262144, 14336, 4096, 1, 32)
    assert blocks.index_unfit(100000, 4096, 6 * 4096, 1, 32) != ""  # a fused projection's gradient row stride
    assert blocks.index_unfit(1, 64, 64, 64, 1024) != ""  # 64 sites' split partials: no call fits


@needs_triton
def test_resolve_checks_the_tokens_when_told_the_widest_row(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.zeros(1, 8192).expand(131072, 8192)  # [T, D], one row of memory
    with pytest.raises(RuntimeError, match="cannot run: 3 site.*at most 87381 tokens"):
        backend.resolve_kernels("triton", x, 8, 4, out_features=8192, groups=3)
    assert backend.resolve_kernels("triton", x[:65536], 8, 4, out_features=8192, groups=3) == "triton"
    assert backend.resolve_kernels("triton", x, 8, 4) == "triton"  # no widest row: what the memo asks


@pytest.fixture
def small_limit(monkeypatch):
    """2^22 elements instead of 2^31, 'auto' picking the kernels as on a GPU (they run interpreted here), fresh
    memos and warnings, and the group launchers counted -> the list of (direction, G) per launcher call."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("AMOLE_KERNELS", raising=False)
    monkeypatch.setattr(blocks, "INDEX_LIMIT", 2**22)
    monkeypatch.setattr(backend, "triton_usable", lambda x, explicit=False: (True, ""))
    monkeypatch.setattr(backend, "_on_gpu", lambda x: True)
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setattr(op, "_EAGER_CHOICE", {})
    monkeypatch.setattr(op_linear, "_PLANS", {})
    fwd, bwd = op_linear._triton()
    calls: list = []

    def counted_fwd(*a, **k):
        calls.append(("fwd", len(a[2])))
        return fwd(*a, **k)

    def counted_bwd(*a, **k):
        calls.append(("bwd", len(a[4])))
        return bwd(*a, **k)

    monkeypatch.setattr(op_linear, "_TRITON", (counted_fwd, counted_bwd))  # folded nodes
    monkeypatch.setattr(adapter_triton, "adapter_triton_group", counted_fwd)  # the unfolded op
    monkeypatch.setattr(adapter_triton_bwd, "adapter_backward_triton_group", counted_bwd)
    return calls


def _sites(n: int, d: int, kernels: str, dropout: float = 0.0, bias: bool = False) -> list[AdaMoLELinear]:
    """n adapted D x D projections (B nonzero); n > 1: linked as q, k and v (one node)."""
    torch.manual_seed(0)
    cfg = ac.AdaMoLEConfig(num_experts=4, rank=4, dropout=dropout, kernels=kernels)
    layers = []
    for _ in range(n):
        layer = AdaMoLELinear(nn.Linear(d, d, bias=bias).requires_grad_(False), ("q",), (tuple(range(d)),), cfg)
        nn.init.normal_(layer.group["q"].lora_B, std=0.1)
        layers.append(layer.train())
    if n > 1:
        for layer in layers:
            layer.__dict__["_siblings"] = tuple(layers)
    return layers


def _fwd_bwd(layers, t: int, d: int):
    """-> (outputs, x's gradient, the parameters' gradients) of one training step on x [T, D]."""
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    x = torch.randn(t, d, requires_grad=True)
    ys = [layer(x) for layer in layers]
    sum((y * torch.linspace(-1, 1, d)).sum() for y in ys).backward()
    return ys, x.grad, [p.grad for layer in layers for p in layer.parameters() if p.requires_grad]


@needs_triton
@pytest.mark.parametrize("n, folded", [(1, True), (3, True), (1, False)])
def test_a_long_call_takes_the_torch_path_once_warned(small_limit, n, folded):
    """One site or linked q, k, v in one folded node; and one site unfolded (a hook on its projection: the op
    runs apart from it)."""
    d = 64
    limit = blocks.max_tokens(d, n, 16)  # 65535 for one site, 21845 for three
    mine, ref = _sites(n, d, "auto"), copy.deepcopy(_sites(n, d, "torch"))
    if not folded:
        mine[0].base_layer.register_forward_hook(lambda mod, args, out: None)
    assert (mine[0].folding_group(torch.zeros(2, d)) is not None) == folded
    _fwd_bwd(mine, 40, d)
    assert small_limit == [("fwd", n), ("bwd", n)]  # a short call: the kernels, the n sites in one launch set
    small_limit.clear()
    with pytest.warns(UserWarning, match=f"{n} site.*at most {limit} tokens"):
        got = _fwd_bwd(mine, limit + 1, d)
    assert small_limit == []  # nothing launched
    want = _fwd_bwd(ref, limit + 1, d)
    for a, b in zip([*got[0], got[1], *got[2]], [*want[0], want[1], *want[2]], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        _fwd_bwd(mine, limit + 1, d)
        _fwd_bwd(mine, 40, d)
    assert small_limit == [("fwd", n), ("bwd", n)]  # short calls are back on the kernels


@needs_triton
def test_triton_asked_for_raises_before_any_launch(small_limit):
    layer, = _sites(1, 64, "triton")
    with pytest.raises(RuntimeError, match="at most 65535 tokens"):
        _fwd_bwd([layer], 65536, 64)
    assert small_limit == []


@needs_triton
def test_the_registered_op_asks_per_call(small_limit):
    """The registered op's choice (traced calls, and the op called directly) checks each call's tokens too."""
    a, b = torch.zeros(16, 64), torch.zeros(64, 16)  # A [K, D], B [O, K]: E 4 x rank 4
    assert op._use_triton("auto", torch.zeros(1, 64).expand(65535, 64), 4, a, b)
    with pytest.warns(UserWarning, match="at most 65535 tokens"):
        assert not op._use_triton("auto", torch.zeros(1, 64).expand(65536, 64), 4, a, b)


@needs_triton
def test_the_launchers_refuse_what_would_wrap(monkeypatch):
    """A caller that skipped the choice meets an error in the launchers, before anything is launched."""
    monkeypatch.setattr(blocks, "INDEX_LIMIT", 2**22)
    launches: list = []
    monkeypatch.setattr(triton_common, "recorder", launches)
    t, d = 65536, 64  # one past 65535
    x, a, b = torch.zeros(t, d), torch.zeros(16, d), torch.zeros(d, 16)  # [T, D], A [K, D], B [O, K]
    scalars = ("lora", 1, 1, 1.0, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="cannot take this call: 1 site.*at most 65535 tokens"):
        adapter_triton.adapter_triton(x, None, a, b, None, None, None, None, *scalars)
    za, zr = torch.zeros(t, 16), torch.zeros(t, 0)
    with pytest.raises(RuntimeError, match="at most 65535 tokens"):
        adapter_triton_bwd.adapter_backward_triton(torch.zeros(t, d), None, x, None, a, b, None, None, None, za, zr,
                                                   *scalars, True)
    assert launches == []
    adapter_triton.adapter_triton(x[:65535], None, a, b, None, None, None, None, *scalars)  # recorded, not run
    assert launches
