"""Triton kernels (run under TRITON_INTERPRET=1 on CPU) against the torch path (`adapter_torch.py`), their ground
truth: the output and every gradient, over odd shapes, E x rank, methods, threshold states and a dtype ->
tolerance table."""

from __future__ import annotations

import os

import pytest
import torch

from amole_compile.kernels import register, resolve_kernels, triton_usable
from amole_compile.kernels.adapter_torch import adapter_backward_torch, adapter_torch
from amole_compile.kernels.adapter_triton import adapter_backward_triton, adapter_triton

ops = register()  # the registered torch.library ops

# On a machine with a GPU the kernels run on CUDA; elsewhere in Triton's interpreter on CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_usable(torch.zeros(1, device=DEVICE), explicit=True)[0],
                                reason="needs triton (CUDA, or TRITON_INTERPRET=1 set by conftest)")

# dtype -> (rtol, atol as a fraction of the reference's largest magnitude)
TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (3e-2, 1.5e-2), torch.float16: (5e-3, 3e-3)}
GRADS = ("x", "lora_a", "lora_b", "gate_w", "thr_w", "thr_b")


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOL[dtype]
    scale = ref.float().abs().max().item() or 1.0
    torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def _tie_free(x, gate, thr_w, thr_b, method, e, top_k, cap, margin=0.02):
    """Resample token rows until routing is far from ties (|a| > margin; top-k gaps > margin)."""
    for _ in range(50):
        logits = x.double() @ gate.double().t()
        if method == "adamole":
            a = torch.softmax(logits, -1) - cap * torch.sigmoid(x.double() @ thr_w.double().t() + thr_b.double())
            bad = (a.abs() < margin).any(-1)
        else:
            top = logits.sort(-1, descending=True).values
            bad = (top[:, top_k - 1] - top[:, top_k] < margin) if top_k < e else torch.zeros(len(x), dtype=bool)
        if not bad.any():
            return x
        x[bad] = torch.randn_like(x[bad])
    raise AssertionError("could not draw tie-free inputs")


def make(method="adamole", e=4, r=4, t=37, d=45, o=29, dtype=torch.float32, thr_state="partial", dropout=True,
         base=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = 1 if method == "lora" else e

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    x = torch.randn(t, d, generator=g)
    gate = torch.randn(e, d, generator=g) * 0.4 if method != "lora" else None
    thr_w = torch.randn(1, d, generator=g) * 0.2 if method == "adamole" else None
    # threshold bias sets the threshold state: -30 -> tau ~ 0 (all active), +30 with cap 1 -> tau = 1 (all masked)
    bias = {"active": -30.0, "partial": 0.0, "masked": 30.0}[thr_state]
    thr_b = torch.full((1,), bias) if method == "adamole" else None
    cap = 1.0 if thr_state == "masked" else 1.0 / e
    k = min(2, e) if method == "mole" else 0
    if method != "lora" and thr_state == "partial":
        x = _tie_free(x, gate, thr_w, thr_b, method, e, k, cap)

    def cast(v):
        return None if v is None else v.to(dtype)

    args = dict(x=x.to(dtype), drop_mask=(torch.rand(t, d, generator=g) > 0.1) if dropout else None,
                lora_a=rnd(e * r, d, s=0.3), lora_b=rnd(o, e * r, s=0.3), gate_w=cast(gate), thr_w=cast(thr_w),
                thr_b=cast(thr_b), base=rnd(t, o) if base else None, method=method, num_experts=e, top_k=k,
                scale=2.0, max_threshold=cap, drop_scale=1 / 0.9)
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def run_both(args, dtype, need_grad_x=True, seed=1, with_aux=True):
    """Forward and backward on both paths, the aux loss computed (methods with a gate) and given a gradient."""
    fwd_args = (*args.values(), with_aux)
    ref, tri = adapter_torch(*fwd_args), adapter_triton(*fwd_args)
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(ref[0].shape, generator=g).to(DEVICE, dtype)
    grad_scores = torch.randn(ref[1].shape, generator=g).to(DEVICE) if args["method"] != "lora" else None
    grad_aux = torch.randn((), generator=g).to(DEVICE) if ref[5].numel() else None
    common = (args["x"], args["drop_mask"], args["lora_a"], args["lora_b"], args["gate_w"], args["thr_w"],
              args["thr_b"])
    tail = (args["method"], args["num_experts"], args["top_k"], args["scale"], args["max_threshold"],
            args["drop_scale"], need_grad_x)
    ref_b = adapter_backward_torch(grad_out, grad_scores, *common, ref[3], ref[4], *tail, grad_aux, ref[6])
    tri_b = adapter_backward_triton(grad_out, grad_scores, *common, ref[3], ref[4], *tail, grad_aux, ref[6])
    return ref, tri, ref_b, tri_b


def check(args, dtype=torch.float32):
    ref, tri, ref_b, tri_b = run_both(args, dtype)
    assert torch.equal(tri[2], ref[2]), "expert masks differ"
    assert (ref[5].numel() == 1) == (args["method"] != "lora" and args["x"].shape[0] > 0)
    for name, a, b in zip(("out", "scores", "mask", "za", "zr", "aux", "aux_sums"), tri, ref, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{name}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        if name != "mask" and b.numel():
            _close(a, b, dtype, name)
    for name, a, b in zip(GRADS, tri_b, ref_b, strict=True):
        assert a.shape == b.shape, f"grad {name}: {a.shape} vs {b.shape}"
        if b.numel():
            _close(a, b, dtype, f"grad {name}")
    return ref


@pytest.mark.parametrize("e,r", [(1, 1), (2, 4), (4, 8), (8, 4), (8, 16), (4, 1), (2, 16), (1, 8)])
@pytest.mark.parametrize("method", ["adamole", "mole"])
def test_experts_by_rank(method, e, r):
    check(make(method, e=e, r=r))


@pytest.mark.parametrize("r", [1, 4, 8, 16])
def test_lora_epilogue(r):
    check(make("lora", r=r))


@pytest.mark.parametrize("thr_state", ["active", "partial", "masked"])
def test_threshold_states(thr_state):
    args = make("adamole", e=8, r=4, thr_state=thr_state)
    mask = check(args)[2]
    frac = mask.float().mean().item()
    assert {"active": frac == 1.0, "partial": 0.0 < frac < 1.0, "masked": frac == 0.0}[thr_state], frac
    if thr_state == "masked":  # nothing selected: the adapter adds exactly nothing
        assert torch.equal(adapter_triton(*args.values())[0], args["base"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["adamole", "mole", "lora"])
def test_dtypes(method, dtype):
    check(make(method, e=4, r=4, dtype=dtype), dtype)


@pytest.mark.parametrize("t,d,o", [(1, 16, 16), (33, 100, 7), (65, 17, 130), (128, 64, 64), (20, 300, 290)])
def test_odd_shapes(t, d, o):
    check(make("adamole", e=4, r=4, t=t, d=d, o=o))


@pytest.mark.parametrize("dropout,base", [(False, False), (True, False), (False, True)])
def test_without_dropout_or_base(dropout, base):
    check(make("adamole", e=2, r=4, dropout=dropout, base=base))


def test_no_grad_x_and_zero_tokens():
    args = make("adamole", e=4, r=4)
    ref, tri, ref_b, tri_b = run_both(args, torch.float32, need_grad_x=False)
    assert tri_b[0].numel() == 0 and ref_b[0].numel() == 0
    zero = make("adamole", e=4, r=4, t=0)
    out = adapter_triton(*zero.values())
    assert out[0].shape == (0, 29) and out[1].shape == (0, 4)


def test_non_contiguous_input_through_the_op():
    args = make("adamole", e=4, r=4, dropout=False, base=False)
    x_t = args["x"].t().contiguous().t()  # same values, transposed strides
    assert not x_t.is_contiguous()
    vals = list(args.values())
    ref = ops.adapter(*vals, "torch")[0]
    vals[0] = x_t
    torch.testing.assert_close(ops.adapter(*vals, "triton")[0], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["adamole", "mole", "lora"])
def test_opcheck_triton_ops(method):
    args = make(method, e=4, r=4, t=20, d=24, o=18)
    for k in ("x", "lora_a", "lora_b", "gate_w", "thr_w", "thr_b", "base"):
        if args[k] is not None:
            args[k] = args[k].clone().requires_grad_()
    for with_aux in (False, True):
        torch.library.opcheck(ops.adapter, (*args.values(), "triton", with_aux), atol=1e-4, rtol=1e-4)
    out = ops.adapter(*args.values(), "triton", True)
    aux = (torch.randn_like(out[5]), out[6].detach()) if method != "lora" else (None, None)
    bwd = (torch.randn_like(out[0]), torch.randn_like(out[1]) if method != "lora" else None, args["x"].detach(),
           args["drop_mask"], *(None if args[k] is None else args[k].detach()
                                for k in ("lora_a", "lora_b", "gate_w", "thr_w", "thr_b")),
           out[3].detach(), out[4].detach(), method, args["num_experts"], args["top_k"], 2.0, args["max_threshold"],
           args["drop_scale"], True, "triton", *aux)
    torch.library.opcheck(ops.adapter_backward, bwd, atol=1e-4, rtol=1e-4)


def test_explicit_triton_without_backend_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_kernels("triton", x)
    monkeypatch.setenv("AMOLE_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="kernels='triton'"):
        resolve_kernels("auto", x)


def test_float64_falls_back_or_errors(monkeypatch):
    assert resolve_kernels("auto", torch.zeros(2, 4, dtype=torch.float64)) == "torch"
    with pytest.raises(RuntimeError, match="float64"):
        resolve_kernels("triton", torch.zeros(2, 4, dtype=torch.float64))
    monkeypatch.setenv("AMOLE_KERNELS", "bogus")
    with pytest.raises(ValueError, match="AMOLE_KERNELS"):
        resolve_kernels("auto", torch.zeros(2, 4))


def test_interpreter_is_what_ci_runs():
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert resolve_kernels("triton", torch.zeros(2, 4)) == "triton"
        assert resolve_kernels("auto", torch.zeros(2, 4)) == "torch"  # auto never picks the interpreter


@pytest.mark.parametrize("measured", ["triton", "torch"])
def test_a_compiled_auto_call_takes_the_measured_path(monkeypatch, measured):
    """Traced, 'auto' takes `backend.COMPILED_AUTO` (where the kernels could run: a GPU, stood in for here); an
    explicit 'triton' (argument or AMOLE_KERNELS) and every eager call take the kernels whatever it says."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from amole_compile.kernels import backend, op

    monkeypatch.setattr(backend, "COMPILED_AUTO", measured)
    monkeypatch.setattr(op, "resolve_kernels", lambda *a, **k: "triton")  # as on a GPU
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("AMOLE_KERNELS", raising=False)
    x, a = torch.zeros(3, 8), torch.zeros(8, 8)

    def picks(kernels: str) -> tuple[bool, bool]:
        seen = []
        make_fx(lambda t: seen.append(op._use_triton(kernels, t, 4, a, a)) or t + 1)(x)
        return seen[0], op._use_triton(kernels, x, 4, a, a)  # (traced, eager)

    assert picks("auto") == (measured == "triton", True)
    assert picks("triton") == (True, True)
    monkeypatch.setenv("AMOLE_KERNELS", "triton")
    assert picks("auto") == (True, True)
