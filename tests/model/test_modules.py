"""`ExpertSet` / `torch.ops.amole.adapter` against the upstream loop over experts `LoopAdaMoLE`: forward, aux loss
and every gradient (A, B, gate, threshold weight and bias, x), over odd shapes, E in {1, 2, 4, 8}, all methods,
with and without masked experts, and the all-masked case; `opcheck` for every method / dropout / base variant.

Legend: T tokens, D in features, O out features, E experts, R rank, K = E * R.
Tolerances (relative to each tensor's scale, see `close`): float64 everywhere, 1e-12; the reference computes MoLE's
top-k softmax (1e-5) and AdaMoLE's aux mask fractions (1e-6) in float32. A wrong formula is off by O(1e-1) or more.
"""

from __future__ import annotations

import pytest
import torch

from amole_compile import AdaMoLEConfig
from amole_compile.kernels import register
from amole_compile.model.modules import ExpertSet, keep_mask

from upstream_loop import LoopAdaMoLE, copy_into, forward_dropped, grads_of, ref_grads

ops = register()  # the registered torch.library ops

F64 = torch.float64
SHAPES = [(7, 13, 5), (33, 24, 40)]  # (T, D, O): not powers of two, D != O both ways
CASES = ([("adamole", e, "masked") for e in (1, 2, 4, 8)] + [("adamole", e, "unmasked") for e in (1, 2, 4, 8)]
         + [("mole", e, None) for e in (1, 2, 4, 8)] + [("mole", 8, 3), ("mole", 4, 4), ("lora", 1, None)])
TOL = {"adamole": 1e-12, "lora": 1e-12, "mole": 1e-5}  # MoLE: the reference's top-k softmax runs in float32
AUX_TOL = 1e-6  # the reference's mask fractions are float32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (and stall on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def close(got, want, tol, what=""):
    """max |got - want| <= tol * max(1, max |want|): a relative bound on the tensor's scale, not per element."""
    assert got.shape == want.shape and got.dtype == want.dtype, what
    err = (got - want).abs().max().item() if got.numel() else 0.0
    bound = tol * max(1.0, want.abs().max().item() if want.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def make_pair(method, e, d, o, *, r=3, alpha=5.0, cap=None, top_k=None, thr_bias=None, dropout=0.0, dtype=F64):
    """A LoopAdaMoLE with random nonzero weights (peaky gate) and an ExpertSet holding the same weights."""
    k = top_k if top_k is not None else min(2, e)
    ref = LoopAdaMoLE(d, o, e, r, alpha, method=method, max_threshold=cap, top_k=k).to(dtype)
    with torch.no_grad():
        ref.gate.weight.mul_(3.0)  # spread the gate probabilities so thresholds mask some experts
        for ex in ref.experts:
            ex.lora_B.weight.normal_()
        if thr_bias is not None:
            ref.threshold_fn.bias.fill_(thr_bias)
    cfg = AdaMoLEConfig(method=method, num_experts=None if method == "lora" else e, rank=r, alpha=alpha,
                        dropout=dropout, max_threshold=cap if method == "adamole" else None,
                        top_k=top_k if method == "mole" else None, kernels="torch")
    site = ExpertSet(d, o, cfg, dtype)
    copy_into(site, ref)
    return site, ref


def run_op(site, x, base=None, drop_mask=None):
    """Call the op directly with the site's parameters -> (out, scores, mask, za, zr) (no aux loss asked for)."""
    return ops.adapter(x, drop_mask, site.lora_A, site.lora_B, site.gate, site.threshold_weight, site.threshold_bias,
                       base, site.method, site.num_experts, site.top_k, site.scale, site.max_threshold,
                       1.0 / (1.0 - site.dropout), "torch")[:5]


def _pair_for(method, e, variant, d, o):
    if method == "mole":
        return make_pair(method, e, d, o, top_k=variant)
    return make_pair(method, e, d, o, thr_bias=-40.0 if variant == "unmasked" else None)


def _check_routing(method, e, variant, mask, k):
    t = mask.shape[0]
    if method == "adamole":
        assert bool(mask.any(-1).all())  # cap = 1/E: at least one expert active per token
        if variant == "masked" and e > 1:
            assert bool((~mask).any())  # some tokens really have experts masked
        if variant == "unmasked":
            assert bool(mask.all())
    elif method == "mole":
        assert torch.equal(mask.sum(-1), torch.full((t,), k))
    else:
        assert bool(mask.all())


@pytest.mark.parametrize("t,d,o", SHAPES)
@pytest.mark.parametrize("method,e,variant", CASES)
def test_forward_matches_upstream_loop(method, e, variant, t, d, o):
    site, ref = _pair_for(method, e, variant, d, o)
    site.eval(), ref.eval()
    x, base = torch.randn(t, d, dtype=F64), torch.randn(t, o, dtype=F64)
    out = site(x, base)  # [T, O]
    close(out, base + ref(x), TOL[method], "out")
    close(site(x), ref(x), TOL[method], "delta")  # base=None
    o2, scores, mask, za, zr = run_op(site, x, base)
    assert torch.equal(o2, out)
    er = {"adamole": e + 1, "mole": e, "lora": 0}[method]
    assert scores.shape == mask.shape == (t, e) and za.shape == (t, e * 3) and zr.shape == (t, er)
    assert scores.dtype == F64 and mask.dtype == torch.bool
    _check_routing(method, e, variant, mask, site.top_k)
    if method != "lora":  # the reference's own selection agrees with the op's mask
        _, selected, ref_scores = ref._route(x)
        assert torch.equal(mask, selected.bool())
        torch.testing.assert_close(scores, ref_scores.to(F64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t,d,o", SHAPES)
@pytest.mark.parametrize("method,e,variant", CASES)
def test_every_gradient_matches_upstream_loop(method, e, variant, t, d, o):
    site, ref = _pair_for(method, e, variant, d, o)
    site.train(), ref.train()  # dropout is 0: no mask; aux is recorded but not in the loss
    x = torch.randn(t, d, dtype=F64)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn(t, o, dtype=F64)
    (site(x1) * g).sum().backward()
    (ref(x2) * g).sum().backward()
    ours, theirs = grads_of(site), ref_grads(ref)
    expected_names = {"adamole": 5, "mole": 3, "lora": 2}[method]
    assert set(ours) == set(theirs) and len(ours) == expected_names
    for name in ours:
        close(ours[name], theirs[name], TOL[method], name)
    close(x1.grad, x2.grad, TOL[method], "x")
    assert ours["lora_A"].abs().max() > 0 and ours["lora_B"].abs().max() > 0
    if method != "lora" and e > 1 and variant != "unmasked":
        assert ours["gate"].abs().max() > 1e-3  # the router really gets a gradient
    if method == "adamole" and e > 1:
        assert ours["threshold_bias"].abs().max() > 0


@pytest.mark.parametrize("method,e,variant", [c for c in CASES if c[0] != "lora"])
def test_aux_loss_and_its_gradients_match_upstream_loop(method, e, variant):
    t, d, o = 33, 24, 40
    site, ref = _pair_for(method, e, variant, d, o)
    site.train(), ref.train()
    x = torch.randn(t, d, dtype=F64)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    site(x1)
    ref(x2)
    assert site.aux.shape == () and site.aux.dtype == F64
    close(site.aux, ref.layer_loss.to(F64), AUX_TOL, "aux")
    site.aux.backward()
    ref.layer_loss.backward()
    ours, theirs = grads_of(site), ref_grads(ref)
    for name in ours:
        close(ours[name], theirs[name], AUX_TOL, name)
    close(x1.grad, x2.grad, AUX_TOL, "x")
    assert torch.count_nonzero(ours["lora_A"]) == 0 and torch.count_nonzero(ours["lora_B"]) == 0
    if (variant == "masked" and e > 1) or (method == "mole" and site.top_k < e):
        assert ours["gate"].abs().max() > 1e-4  # with every expert selected, sum_i P_i has no gate gradient
    if variant == "masked":  # (unmasked: the bias sits at -40, where sigmoid has no slope left)
        assert ours["threshold_bias"].abs().max() > 1e-6


def test_aux_loss_formula_by_hand():
    """E * sum_i f_i P_i with the *shifted* scores (AdaMoLE), checked on a 3-token hand-made routing."""
    site, _ = make_pair("adamole", 4, 6, 5, thr_bias=0.0)
    site.train()
    x = torch.randn(3, 6, dtype=F64)
    _, scores, mask, _, zr = run_op(site, x)
    p = torch.softmax(zr[:, :4], -1)
    a = p - 0.25 * torch.sigmoid(zr[:, 4:] + site.threshold_bias)
    torch.testing.assert_close(scores, a, rtol=0, atol=1e-15)
    site(x)
    f = (a >= 0).to(F64).mean(0)
    torch.testing.assert_close(site.aux, 4 * (f * a.mean(0)).sum(), rtol=1e-14, atol=0)
    assert not torch.allclose(site.aux, 4 * (f * p.mean(0)).sum())  # raw probabilities would be a different loss


@pytest.mark.parametrize("e", [2, 4, 8])
def test_all_masked_adds_exactly_zero(e):
    t, d, o = 11, 13, 7
    site, ref = make_pair("adamole", e, d, o, cap=1.0, thr_bias=50.0)  # tau = sigmoid(~50) = 1 > every p_i
    site.train()
    x = torch.randn(t, d, dtype=F64, requires_grad=True)
    base = torch.randn(t, o, dtype=F64)
    out, scores, mask, _, _ = run_op(site, x, base)
    assert not mask.any() and bool((scores < 0).all())
    assert torch.equal(out, base)
    assert torch.equal(ref(x.detach()), torch.zeros(t, o, dtype=F64))  # the reference agrees: nothing selected
    delta = site(x)
    assert torch.equal(delta, torch.zeros(t, o, dtype=F64))
    ((site(x, base) * torch.randn(t, o, dtype=F64)).sum() + site.aux).backward()
    assert site.aux.item() == 0.0
    for name, grad in grads_of(site).items():
        assert torch.count_nonzero(grad) == 0, name
    assert torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("method", ["adamole", "mole", "lora"])
def test_float32_site_matches_float64_torch_path(method):
    e = 1 if method == "lora" else 4
    site, ref = make_pair(method, e, 24, 40, dtype=torch.float32)
    ref.double()
    x = torch.randn(33, 24)
    out = site(x)
    assert out.dtype == torch.float32 and run_op(site, x)[1].dtype == torch.float32
    torch.testing.assert_close(out.double(), ref(x.double()), rtol=1e-5, atol=1e-5)


# ---- opcheck ------------------------------------------------------------------------------------------

def _op_args(method, with_mask, with_base, t=5, d=7, o=6, e=3, r=2):
    e = 1 if method == "lora" else e
    g = torch.Generator().manual_seed(1)

    def p(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).requires_grad_(True)

    mask = torch.rand(t, d, generator=g) > 0.3 if with_mask else None
    return (p(t, d), mask, p(e * r, d), p(o, e * r), p(e, d) if method != "lora" else None,
            p(1, d) if method == "adamole" else None, p(1) if method == "adamole" else None,
            p(t, o) if with_base else None, method, e, 2 if method == "mole" else 0, 1.5,
            1.0 / e if method == "adamole" else 0.0, 1 / 0.7 if with_mask else 1.0, "torch")


@pytest.mark.parametrize("with_base", [False, True], ids=["nobase", "base"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nodrop", "drop"])
@pytest.mark.parametrize("method", ["adamole", "mole", "lora"])
def test_opcheck(method, with_mask, with_base):
    result = torch.library.opcheck(ops.adapter, _op_args(method, with_mask, with_base))
    assert set(result) == {"test_schema", "test_autograd_registration", "test_faketensor",
                           "test_aot_dispatch_dynamic"}
    assert all(v == "SUCCESS" for v in result.values()), result


def test_op_is_registered():
    assert torch.ops.amole.adapter.default is not None
    assert torch.ops.amole.adapter_backward.default is not None
    assert ops.adapter._opoverload is torch.ops.amole.adapter.default


# ---- dropout ------------------------------------------------------------------------------------------

def _capture_mask(site):
    """Wrap site.drop_mask so the [T, D] mask drawn in the next forward is kept in the returned list."""
    seen, draw = [], site.drop_mask

    def wrapper(x):
        m = draw(x)
        seen.append(m)
        return m

    site.drop_mask = wrapper
    return seen


@pytest.mark.parametrize("method,e", [("adamole", 4), ("mole", 4), ("lora", 1)])
def test_dropout_mask_shared_by_experts_and_router_sees_undropped_input(method, e):
    t, d, o, p = 29, 24, 10, 0.4
    site, ref = make_pair(method, e, d, o, dropout=p)
    site.train(), ref.eval()
    x = torch.randn(t, d, dtype=F64, requires_grad=True)
    base = torch.randn(t, o, dtype=F64)
    seen = _capture_mask(site)
    out = site(x, base)
    (mask,) = seen
    assert mask.shape == (t, d) and mask.dtype == torch.bool and bool(mask.any()) and bool((~mask).any())
    assert torch.equal(out, run_op(site, x, base, drop_mask=mask)[0])  # the op called with the same mask
    # by hand: router on x, every expert on the same x * mask / (1 - p)
    xd = x.detach() * mask / (1 - p)
    close(out, base + forward_dropped(ref, x.detach(), xd), TOL[method], "shared mask")
    assert not torch.allclose(out, base + ref(x.detach()))  # dropout really changed the output
    if method != "lora":  # a router fed the dropped input would give a different result
        assert not torch.allclose(out, base + forward_dropped(ref, xd, xd), rtol=1e-4, atol=1e-4)
        close(run_op(site, x, None, mask)[1], run_op(site, x, None, None)[1], 1e-13, "scores")  # undropped x
    # gradients through the mask: the same hand formula under autograd
    g = torch.randn(t, o, dtype=F64)
    (out * g).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (forward_dropped(ref, x2, x2 * mask / (1 - p)) * g).sum().backward()
    for name, grad in grads_of(site).items():
        close(grad, ref_grads(ref)[name], TOL[method], name)
    close(x.grad, x2.grad, TOL[method], "x")


def test_dropout_rate_and_eval_mode():
    site, _ = make_pair("adamole", 4, 50, 6, dropout=0.3)
    site.train()
    mask = site.drop_mask(torch.randn(400, 50, dtype=F64))
    assert abs((~mask).double().mean().item() - 0.3) < 0.02
    site.eval()
    assert site.drop_mask(torch.randn(3, 50, dtype=F64)) is None
    x = torch.randn(9, 50, dtype=F64)
    assert torch.equal(site(x), site(x)) and torch.equal(site(x), run_op(site, x)[0])
    site.train()
    site.dropout = 0.0
    assert site.drop_mask(x) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dropout_rate_is_exact_in_half_precision(dtype):
    # a mask drawn in the input's dtype would quantise p: bf16 uniforms come in steps of 1/256, so p = 0.05 would
    # drop 13/256 = 0.0508 of the elements, 7 standard deviations off at this size
    torch.manual_seed(0)
    x = torch.zeros(2048, 2048, dtype=dtype)
    site, _ = make_pair("adamole", 4, 2048, 6, dropout=0.05)
    site.train()
    rates = [(~site.drop_mask(x)).double().mean().item(),  # one site
             (~keep_mask(x, 0.05, one_launch=True)).double().mean().item(),  # the GPU's draw (bernoulli_)
             (~keep_mask(x, torch.tensor([[0.05]]))).double().mean().item()]  # a mixed batch: p per row
    assert all(abs(r - 0.05) < 3.5e-4 for r in rates), rates  # std of the rate: 1.1e-4


# ---- zero tokens --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("method,e", [("adamole", 4), ("mole", 4), ("lora", 1)])
def test_zero_tokens_forward(method, e, dropout):
    site, _ = make_pair(method, e, 13, 5, dropout=dropout)
    for training in (False, True):
        site.train(training)
        x = torch.empty(0, 13, dtype=F64)
        assert site(x, torch.empty(0, 5, dtype=F64)).shape == (0, 5)
        assert site(x).shape == (0, 5)
        assert site.aux is None  # nothing to average over: no aux recorded
        out, scores, mask, za, zr = run_op(site, x)
        assert scores.shape == mask.shape == (0, e) and za.shape == (0, 3 * e)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("method,e", [("adamole", 4), ("mole", 4), ("lora", 1)])
def test_zero_tokens_backward(method, e, dropout):
    site, _ = make_pair(method, e, 13, 5, dropout=dropout)
    site.train()
    x = torch.empty(0, 13, dtype=F64, requires_grad=True)
    site(x, torch.empty(0, 5, dtype=F64)).sum().backward()
    assert x.grad.shape == (0, 13)
    for name, grad in grads_of(site).items():
        assert grad is not None and torch.count_nonzero(grad) == 0, name


# ---- aux loss recording -------------------------------------------------------------------------------

@pytest.mark.parametrize("method,e", [("adamole", 4), ("mole", 4), ("lora", 1)])
def test_aux_recorded_only_in_training_mode(method, e):
    site, _ = make_pair(method, e, 13, 5)
    x = torch.randn(6, 13, dtype=F64)
    site.eval()
    site(x)
    assert site.aux is None
    site.train()
    site(x)
    if method == "lora":
        assert site.aux is None
        return
    assert site.aux is not None and site.aux.shape == () and site.aux.requires_grad
    site.eval()
    site(x)
    assert site.aux is None  # a stale training value is dropped


def _model_sites(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertSet)]


def test_model_aux_loss_is_the_sum_over_sites():
    from amole_compile import aux_loss, transform

    from models import build, ids

    model = transform(build("llama"), AdaMoLEConfig(num_experts=4, rank=2))
    sites = _model_sites(model)
    assert len(sites) == 8
    fresh = aux_loss(model)
    assert fresh.shape == () and fresh.item() == 0.0
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: inputs.__setitem__(n, args[0].detach().flatten(0, -2)))
             for n, m in sites]
    model.eval()  # (explicitly: the new adapter modules' own mode is tested in test_swap_modules)
    model(input_ids=ids())
    assert len(inputs) == 8 and aux_loss(model).item() == 0.0  # eval mode records nothing
    model.train()
    model(input_ids=ids())
    for h in hooks:
        h.remove()
    total = aux_loss(model)
    assert total.shape == () and total.requires_grad
    # each site's loss from its own input by the formula: E * sum_i mean_t(m) * mean_t(a)
    per_site = []
    for n, m in sites:
        zr = inputs[n] @ torch.cat([m.gate, m.threshold_weight]).detach().t()
        a = torch.softmax(zr[:, :4], -1) - 0.25 * torch.sigmoid(zr[:, 4:] + m.threshold_bias.detach())
        per_site.append(4 * ((a >= 0).float().mean(0) * a.mean(0)).sum())
    torch.testing.assert_close(total.detach(), torch.stack(per_site).sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, torch.stack([m.aux for _, m in sites]).sum(), rtol=0, atol=0)
    assert abs(total.item() - torch.stack(per_site).mean().item()) > 0.1  # a sum, not a mean
    total.backward()
    assert all(m.gate.grad is not None and m.gate.grad.abs().max() > 0 for _, m in sites)
    model.eval()
    model(input_ids=ids())
    assert aux_loss(model).item() == 0.0


def test_aux_loss_without_sites_is_a_zero_scalar():
    from amole_compile import aux_loss

    for model in (torch.nn.Linear(3, 3), torch.nn.Module()):
        z = aux_loss(model)
        assert z.shape == () and z.item() == 0.0


def test_expert_sets_walk_is_modules_order_once_each():
    """The loss hooks' fast walk finds the sites `model.modules()` finds, in that order, a shared one once."""
    from amole_compile import transform
    from amole_compile.model.modules import expert_sets

    from models import build

    model = transform(build("llama"), AdaMoLEConfig(num_experts=4, rank=2))
    want = [m for m in model.modules() if isinstance(m, ExpertSet)]
    assert expert_sets(model) == want and len(want) == 8
    outer = torch.nn.ModuleList([model, torch.nn.Linear(2, 2), model.model.layers[0]])  # shared: seen once
    assert expert_sets(outer) == [m for m in outer.modules() if isinstance(m, ExpertSet)] == want
    assert expert_sets(torch.nn.Linear(2, 2)) == []
