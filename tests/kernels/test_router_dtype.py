"""Routing in float32 whatever the activation dtype (as HF's MoE routers do): float16 and bfloat16 sites with
large gate weights route as a float64 copy of the same weights does, in every form (the op's torch path, the
Triton kernels, mixed batches, ONNX), and the adapter's output comes back in the activation dtype.

float16: the gate logits are ~1e5 (gate weights ±2e4), beyond float16's 65504 (a logit computed in float16 is
inf, the softmax NaN).
bfloat16: the logits share a large common part (~2e3, where bfloat16's spacing is 8) and differ by a few units
(rounded in bfloat16 they tie or swap).

Legend: T tokens, D in, OUT out, E experts.
"""

from __future__ import annotations

import pytest
import torch

from amole_compile import AdaMoLEConfig
from amole_compile.kernels import adapter
from amole_compile.kernels.mixed_torch import mixed_adapter, stack_sites
from amole_compile.model.modules import ExpertSet

T, D, OUT, E = 24, 32, 16, 4


def site(method: str, dtype: torch.dtype) -> ExpertSet:
    """A site whose gate logits overflow float16 (float16) or tie when rounded to bfloat16 (bfloat16)."""
    s = ExpertSet(D, OUT, AdaMoLEConfig(method=method, num_experts=E, rank=2, dropout=0.0), dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        s.lora_B.normal_(0, 0.1, generator=g)
        if dtype == torch.float16:
            s.gate.copy_(torch.randn(E, D, generator=g, dtype=torch.float64).sign() * 20000)
        else:
            s.gate.fill_(64.0)
            s.gate[:, 0] += torch.arange(E, dtype=torch.float64) * 3  # 64, 67, 70, 73: exact in bfloat16
    return s.to(dtype)


def inputs(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    if dtype == torch.bfloat16:
        x[:, 1:] = x[:, 1:].abs()  # the common part large and positive, x[:, 0] sets the differences
    return x.to(dtype)


def reference(s: ExpertSet, x: torch.Tensor):
    """The same (half-valued) weights and input in float64: (out, scores, mask)."""
    ref = ExpertSet(D, OUT, s_config(s), dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in s.state_dict().items()})
    out, scores, mask, *_ = adapter(*ref.op_args(x.double(), None, None)._replace(kernels="torch"))
    return out, scores, mask


def s_config(s: ExpertSet) -> AdaMoLEConfig:
    return AdaMoLEConfig(method=s.method, num_experts=s.num_experts, rank=s.rank, dropout=0.0)


def forms(s: ExpertSet, x: torch.Tensor, kernels: str):
    """(out, scores, mask) of the form: the op ('torch' / 'triton') or a mixed batch of the site alone."""
    if kernels == "mixed":
        delta, scores, mask = mixed_adapter(x[None], torch.zeros(1, dtype=torch.long), stack_sites([s.weights()]))
        return delta[0], scores[0, :, :E], mask[0, :, :E]
    out, scores, mask, *_ = adapter(*s.op_args(x, None, None)._replace(kernels=kernels))
    return out, scores, mask


@pytest.mark.parametrize("method", ["adamole", "mole"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kernels", ["torch", "triton", "mixed"])
def test_half_sites_route_in_float32(method, dtype, kernels):
    s, x = site(method, dtype), inputs(dtype)
    want_out, want_scores, want_mask = reference(s, x)
    assert 1 < want_mask.sum(0).count_nonzero() and want_mask.any(1).all()  # routing varies between tokens
    out, scores, mask = forms(s, x, kernels)
    assert out.dtype == dtype and scores.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(scores).all()
    assert torch.equal(mask, want_mask), (mask != want_mask).sum()
    torch.testing.assert_close(scores.double(), want_scores, rtol=0, atol=5e-4)  # fp32 logits ~2e3: 1e-4 ulps
    torch.testing.assert_close(out.double(), want_out, rtol=2e-2, atol=2e-2)


def test_float16_site_routes_in_float32_in_onnx(tmp_path):
    """The ONNX translation too (float16: onnxruntime's CPU provider runs it; numpy has no bfloat16 to feed)."""
    ort = pytest.importorskip("onnxruntime")
    from test_forms import OpModule

    from amole_compile.export._translation import translation_table

    s, x = site("adamole", torch.float16).eval(), inputs(torch.float16)
    want_out, _, want_mask = reference(s, x)
    base = torch.zeros(T, OUT, dtype=torch.float16)
    prog = torch.onnx.export(OpModule(s).eval(), (x, base), input_names=["x", "base"],
                             output_names=["out", "scores", "mask"], dynamo=True, verbose=False,
                             custom_translation_table=translation_table())
    prog.save(tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    out, _, mask = sess.run(None, {"x": x.numpy(), "base": base.numpy()})
    assert torch.equal(torch.from_numpy(mask), want_mask)
    torch.testing.assert_close(torch.from_numpy(out).double(), want_out, rtol=2e-2, atol=2e-2)
