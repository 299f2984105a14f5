"""`AdaMoLELinear` folds a plain frozen nn.Linear into its site's op (`op.adapter_linear`): one autograd node that
computes F.linear(x, W, b), adds the adapter's up-projection into it, and adds grad_out W into the adapter's x
gradient, where the unfolded path (`add_to(x, base_layer(x))`) leaves autograd a second node and an add.

Checked against the unfolded path on the same module and inputs: the output, the routing, the aux loss and every
parameter gradient bit for bit; x's gradient within the dtype's tolerance (it is rounded once instead of twice),
exactly in float64. Then every case that must not fold (hooks, trained or quantized weights, subclasses, autocast,
other dtypes, mixed batches, several roles, traced calls) runs the projection as itself.

Legend: B rows, S tokens per row, D in features, O out features.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import amole_compile as ac
from amole_compile.kernels import triton_usable
from amole_compile.model.projection import AdaMoLELinear

from mixed_models import adapted
from models import build, ids

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = ["torch"] + (["triton"] if triton_usable(torch.zeros(1, device=DEVICE), explicit=True)[0] else [])
GRAD_X_TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 2e-2)}


def _layer(method="adamole", dtype=torch.float32, bias=True, dropout=0.1, kernels="torch", d=24, o=20, **cfg):
    torch.manual_seed(0)
    lin = nn.Linear(d, o, bias=bias, dtype=dtype, device=DEVICE).requires_grad_(False)
    e, r = (1, 8) if method == "lora" else (4, 2)
    config = ac.AdaMoLEConfig(method=method, num_experts=e, rank=r, dropout=dropout, kernels=kernels, **cfg)
    layer = AdaMoLELinear(lin, ("q",), (tuple(range(o)),), config).train()
    for site in layer.group.values():
        nn.init.normal_(site.lora_B, std=0.3)
    return layer


def _run(layer, x, unfolded: bool, seed=1):
    """-> (out, aux, {name: grad}, grad_x) of one fwd + bwd, with the dropout mask drawn from `seed`."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    torch.manual_seed(seed)
    out = layer.add_to(x, layer.base_layer(x)) if unfolded else layer(x)
    auxes = [site.aux for site in layer.group.values() if site.aux is not None]
    aux = torch.stack(auxes).sum() if auxes else None
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
    loss = (out.float() * w.float()).sum() + (1.7 * aux.float() if aux is not None else 0)
    params = [p for p in layer.parameters() if p.requires_grad]
    leaves = params + ([x] if x.requires_grad else [])
    grads = torch.autograd.grad(loss, leaves)
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    return out, aux, dict(zip(names, grads[:len(params)], strict=True)), grads[-1] if x.requires_grad else None


# the kernels take float32, bfloat16 and float16; the torch path float64 too
PATHS = [(k, dt) for k in KERNELS for dt in (torch.float64, torch.float32, torch.bfloat16)
         if not (k == "triton" and dt == torch.float64)]


@pytest.mark.parametrize(("kernels", "dtype"), PATHS)
@pytest.mark.parametrize("method", ["adamole", "mole", "lora"])
@pytest.mark.parametrize(("lead", "bias", "x_grad"), [((3, 5), True, True), ((7,), False, True), ((2, 4), True, False)])
def test_fold_equals_the_projection_plus_the_op(kernels, method, dtype, lead, bias, x_grad):
    layer = _layer(method, dtype, bias, kernels=kernels)
    x = torch.randn(*lead, 24, dtype=dtype, device=DEVICE, requires_grad=x_grad)  # [..., D]
    assert layer.folding_group(x) is layer.group
    out, aux, grads, gx = _run(layer, x, unfolded=False)
    ref, ref_aux, ref_grads, ref_gx = _run(layer, x, unfolded=True)
    assert out.shape == (*lead, 20) and out.grad_fn is not None
    assert type(out.grad_fn).__name__ == "_EagerLinearAdapterBackward"
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    if method != "lora":
        torch.testing.assert_close(aux, ref_aux, rtol=0, atol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) == {"adamole": 5, "mole": 3, "lora": 2}[method]
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    if x_grad:
        rtol, atol = GRAD_X_TOL[dtype]
        scale = ref_gx.abs().max().item()
        torch.testing.assert_close(gx, ref_gx, rtol=rtol, atol=atol * scale)


def test_fold_is_one_node_and_saves_no_second_x_gradient():
    """Folded: the op's node and the parameters' AccumulateGrads, nothing of the projection's (its mm node, and
    the add that sums two x gradients)."""
    layer = _layer(dropout=0.0)
    x = torch.randn(3, 5, 24, device=DEVICE, requires_grad=True)
    assert _node_types(layer(x)) == {"_EagerLinearAdapterBackward": 1, "AccumulateGrad": 6}
    unfolded = _node_types(layer.add_to(x, layer.base_layer(x)))
    assert unfolded["_EagerAdapterBackward"] == 1 and sum(unfolded.values()) > 7


def test_fold_checks_the_weights_version():
    """The folded node saves W as the projection's node would: changed in place before the backward, it raises."""
    layer = _layer()
    x = torch.randn(4, 24, device=DEVICE, requires_grad=True)
    out = layer(x)
    with torch.no_grad():
        layer.base_layer.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_fold_under_no_grad_and_inference_mode():
    layer = _layer().eval()
    x = torch.randn(2, 3, 24, device=DEVICE)
    want = layer.add_to(x, layer.base_layer(x)).detach()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), want, rtol=0, atol=0)


class _Doubled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def _with_hook(kind):
    def make(layer):
        seen = []
        base = layer.base_layer
        if kind == "pre":
            base.register_forward_pre_hook(lambda m, args: seen.append(1))
        elif kind == "post":
            base.register_forward_hook(lambda m, args, out: seen.append(1))
        elif kind == "backward":
            base.register_full_backward_hook(lambda m, gi, go: seen.append(1))
        elif kind == "instance forward":  # what accelerate's add_hook_to_module does
            base.forward = functools.partial(lambda mod, x: (seen.append(1), nn.Linear.forward(mod, x))[1], base)
        return seen
    return make


def _global_hook(layer):
    seen = []
    handle = nn.modules.module.register_module_forward_pre_hook(lambda m, args: seen.append(1))
    layer._test_handle = handle
    return seen


def _unfoldable():
    def trained_weight(layer):
        layer.base_layer.weight.requires_grad_(True)

    def trained_bias(layer):
        layer.base_layer.bias.requires_grad_(True)

    def subclass(layer):
        layer.base_layer.__class__ = _Doubled

    def subclass_weight(layer):
        class Marked(torch.Tensor):
            pass
        w = layer.base_layer.weight
        layer.base_layer.weight = nn.Parameter(w.detach().as_subclass(Marked), requires_grad=False)

    def patched(owner, name):
        def make(layer):
            seen = []
            original = getattr(owner, name)

            def wrapper(*args, **kwargs):
                seen.append(1)
                return original(*args, **kwargs)

            layer._test_undo = lambda: setattr(owner, name, original)
            setattr(owner, name, wrapper)
            return seen
        return make

    return {"forward pre-hook": _with_hook("pre"), "nn.Linear.forward patched": patched(nn.Linear, "forward"),
            "F.linear patched": patched(nn.functional, "linear"),
            "forward hook": _with_hook("post"),
            "backward hook": _with_hook("backward"), "instance forward": _with_hook("instance forward"),
            "global hook": _global_hook, "trained weight": trained_weight, "trained bias": trained_bias,
            "subclass": subclass, "weight subclass": subclass_weight}


@pytest.mark.parametrize("case", sorted(_unfoldable()))
def test_what_does_not_fold_runs_the_projection_itself(case):
    layer = _layer()
    seen = _unfoldable()[case](layer)
    try:
        x = torch.randn(2, 3, 24, device=DEVICE, requires_grad=True)
        assert layer.folding_group(x) is None
        torch.manual_seed(1)
        out = layer(x)
        assert type(out.grad_fn).__name__ != "_EagerLinearAdapterBackward"
        out.sum().backward()
        if seen is not None:
            assert seen, f"{case}: the base layer's hook did not run"
        torch.manual_seed(1)
        want = layer.add_to(x, layer.base_layer(x))  # the projection as itself
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        if case.startswith("trained"):
            assert any(p.grad is not None for p in layer.base_layer.parameters())
    finally:
        handle = getattr(layer, "_test_handle", None)
        if handle is not None:
            handle.remove()
        undo = layer.__dict__.get("_test_undo")
        if undo is not None:
            undo()


@pytest.mark.parametrize("as_parameter", [True, False])
def test_functional_call_weights_reach_the_fold(as_parameter):
    """torch.func.functional_call swaps the base weight for the call: a frozen Parameter folds, a plain tensor runs
    the projection itself; either way the output is the swapped weight's."""
    layer = _layer(dropout=0.0).eval()
    x = torch.randn(2, 3, 24, device=DEVICE)
    w2 = torch.randn(20, 24, device=DEVICE)
    want = layer.add_to(x, nn.functional.linear(x, w2, layer.base_layer.bias))
    given = nn.Parameter(w2, requires_grad=False) if as_parameter else w2
    folded = []
    layer.register_forward_pre_hook(lambda m, args: folded.append(m.folding_group(args[0]) is not None))
    out = torch.func.functional_call(layer, {"base_layer.weight": given}, (x,))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert folded == [as_parameter]


def test_no_fold_under_autocast_or_another_adapter_dtype():
    layer = _layer(dtype=torch.float32)
    x = torch.randn(2, 3, 24, device=DEVICE)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        assert layer.folding_group(x) is None
        assert layer(x).dtype == torch.bfloat16  # the projection ran under autocast, as unadapted
    other = _layer(dtype=torch.float32, adapter_dtype="bfloat16")
    assert other.folding_group(x) is None
    assert other(x).dtype == torch.float32
    assert layer.folding_group(x.double()) is None


def _fused(columns, roles=("q", "k", "v"), dtype=torch.float32, kernels="torch", dropout=0.1, method="adamole"):
    """A fused projection (one nn.Linear, a site per role writing `columns`), B nonzero."""
    torch.manual_seed(0)
    o = sum(len(c) for c in columns)
    lin = nn.Linear(24, o, dtype=dtype, device=DEVICE).requires_grad_(False)
    config = ac.AdaMoLEConfig(method=method, num_experts=2, rank=2, dropout=dropout, kernels=kernels)
    layer = AdaMoLELinear(lin, roles, tuple(tuple(c) for c in columns), config).train()
    for site in layer.group.values():
        nn.init.normal_(site.lora_B, std=0.3)
    return layer


def _blocks(*sizes):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [range(a, a + n) for a, n in zip(starts, sizes, strict=True)]


@pytest.mark.parametrize(("kernels", "dtype"), PATHS)
@pytest.mark.parametrize(("roles", "sizes"), [(("q", "k", "v"), (12, 6, 6)), (("gate", "up"), (10, 10))])
def test_a_fused_projection_folds_every_role(kernels, dtype, roles, sizes):
    """q | k | v (GQA widths) and gate | up in contiguous blocks: one node adds each role's delta into its block
    of the projection's output (one rounding, where the unfolded path rounded the delta, concatenated the roles'
    and added them: equal in float64, within rounding below), and sums the roles' x gradients and the
    projection's; every parameter gradient is the unfolded path's bit for bit."""
    layer = _fused(_blocks(*sizes), roles, dtype, kernels)
    x = torch.randn(3, 5, 24, dtype=dtype, device=DEVICE, requires_grad=True)
    assert layer.folding_group(x) is layer.group
    out, _, grads, gx = _run(layer, x, unfolded=False)
    ref, _, ref_grads, ref_gx = _run(layer, x, unfolded=True)
    assert type(out.grad_fn).__name__ == "_EagerLinearAdapterBackward"
    rtol, atol = GRAD_X_TOL[dtype]
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol * ref.abs().max().item())
    assert grads.keys() == ref_grads.keys() and len(grads) == 5 * len(roles)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(gx, ref_gx, rtol=rtol, atol=atol * ref_gx.abs().max().item())
    for role in roles:  # each site recorded its own aux loss, as unfolded
        assert layer.group[role].aux is not None


def test_no_fold_for_interleaved_roles_or_no_adapter():
    interleaved = _fused([range(0, 18, 3), range(1, 18, 3), range(2, 18, 3)])
    x = torch.randn(2, 3, 24, device=DEVICE)
    assert interleaved.folding_group(x) is None
    layer = _layer()
    layer.active = None
    assert layer.folding_group(x) is None
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)


def test_no_fold_when_a_site_has_a_hook_or_its_own_forward():
    """The fold does not call the sites as modules: a hook on one, or a forward of its own, keeps the path that
    does (and the hook runs)."""
    layer = _fused(_blocks(12, 6, 6))
    x = torch.randn(2, 3, 24, device=DEVICE)
    seen = []
    handle = layer.group["k"].register_forward_hook(lambda m, args, out: seen.append(1))
    assert layer.folding_group(x) is None
    layer(x)
    assert seen == [1]
    handle.remove()
    assert layer.folding_group(x) is layer.group
    site = layer.group["v"]
    site.forward = functools.partial(type(site).forward, site)
    assert layer.folding_group(x) is None


def test_no_fold_inside_a_mixed_batch():
    model = adapted()
    ac.set_active_adapter(model, "a")
    layer = next(m for m in model.modules() if isinstance(m, AdaMoLELinear))
    x = torch.randn(4, 6, layer.in_features)
    assert layer.folding_group(x) is not None
    with ac.batch_adapters(model, ["a", "b", None, "c"]):
        assert layer.folding_group(x) is None


def test_traced_calls_keep_the_projection_and_the_registered_op():
    """make_fx (as torch.compile and torch.export) records the projection and `amole.adapter` as they are."""
    layer = _layer(dropout=0.0).eval()
    x = torch.randn(2, 3, 24, device=DEVICE)
    gm = make_fx(layer)(x)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.amole.adapter.default in targets
    assert any(t in targets for t in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default,
                                      torch.ops.aten.linear.default))
    torch.testing.assert_close(gm(x), layer(x), rtol=0, atol=0)


def _node_types(t: torch.Tensor) -> dict:
    seen, stack, types = set(), [t.grad_fn], {}
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        types[type(fn).__name__] = types.get(type(fn).__name__, 0) + 1
        stack.extend(f for f, _ in fn.next_functions)
    return types


def test_no_fold_when_add_to_is_shadowed():
    """`transform`'s check pass shadows `add_to` on the instance to see that the adapters run: the call reaches
    it, and a dead adapter is still reported."""
    layer = _layer()
    ran = []
    layer.__dict__["add_to"] = lambda x, y: (ran.append(1), y)[1]
    x = torch.randn(2, 3, 24, device=DEVICE)
    assert layer.folding_group(x) is None
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    assert ran == [1]


@pytest.mark.parametrize("arch", ["llama", "mistral", "phi3"])
def test_a_model_trains_the_same_folded(arch, monkeypatch):
    """A whole model's training step (every projection folded: attention and MLP roles; Phi-3's fused qkv_proj
    and gate_up_proj too) against the same step with the fold off: the loss and logits, and every gradient,
    within float32 rounding."""
    torch.manual_seed(0)
    model = ac.transform(build(arch), ac.AdaMoLEConfig(num_experts=4, rank=4, dropout=0.1, roles="all")).train()
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            nn.init.normal_(p, std=0.05)
    batch = ids(2, 7)

    def step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # the same dropout masks
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    folded, grads = step()
    n_sites = sum(isinstance(m, AdaMoLELinear) for m in model.modules())
    assert n_sites >= 7 and all(m.folding_group(torch.zeros(1, m.in_features)) is not None
                                for m in model.modules() if isinstance(m, AdaMoLELinear))
    monkeypatch.setattr(AdaMoLELinear, "folding_group", lambda self, x: None)
    unfolded, ref = step()
    torch.testing.assert_close(folded.logits, unfolded.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(folded.loss, unfolded.loss, rtol=1e-6, atol=0)
    n_roles = sum(len(m.roles) for m in model.modules() if isinstance(m, AdaMoLELinear))
    assert grads.keys() == ref.keys() and len(grads) == 5 * n_roles
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-6 * ref[name].abs().max().item(),
                                   msg=lambda m, n=name: f"{n}: {m}")



@pytest.mark.parametrize("shape", [(0, 24), (2, 0, 24), (24,)])
def test_fold_of_empty_and_one_dimensional_inputs(shape):
    """No tokens, or a single vector: the folded call gives the unfolded call's output and gradients."""
    for layer in (_layer(), _fused(_blocks(12, 6, 6))):
        x = torch.randn(*shape, device=DEVICE, requires_grad=True)
        assert layer.folding_group(x) is layer.group
        out, _, grads, gx = _run(layer, x, unfolded=False)
        ref, _, ref_grads, ref_gx = _run(layer, x, unfolded=True)
        assert out.shape == ref.shape == (*shape[:-1], layer.out_features) and gx.shape == x.shape
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-6, atol=1e-7)


def test_a_global_hook_registry_torch_no_longer_has_reads_as_hooked(monkeypatch):
    """The fold reads torch's private registries of global hooks; were one renamed away, it would not fold
    (rather than miss a hook)."""
    layer = _layer()
    x = torch.randn(2, 24, device=DEVICE)
    assert layer.folding_group(x) is layer.group
    monkeypatch.delattr(nn.modules.module, "_global_forward_hooks")
    assert layer.folding_group(x) is None

