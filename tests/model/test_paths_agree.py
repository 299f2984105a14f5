"""Whole models on the Triton kernels (Triton's interpreter on CPU) against the torch path, both held to a float64
run of the torch path: every parameter gradient, the logits and the loss of one training step. Each case takes
another way through the model layer: q, k and v linked in one node (Llama, grouped-query), a fused projection's
role blocks read in place (Phi-3's qkv_proj and gate_up_proj, Falcon's multi-query query_key_value), an
interleaved fused layout (GPT-NeoX), bases that do not fold (GPT-2's Conv1D, Falcon's own Linear, whose MLP adds
into the projection's output in place), over the three methods, top-k, a threshold cap and a padded batch.

Each path rounds in its own order, and a float32 step amplifies rounding where the routing sits near a decision
(the threshold, top-k). So the kernels' error against float64 is held to at most 10x the torch path's, plus a
floor (2e-4 of the largest magnitude in float32, 4e-2 in bfloat16): a wrong formula, a missed block or a stale
read is off by orders of magnitude more (a 0.1% error in one threshold bias's gradient fails three cases). No
dropout here, so that the float64 run computes the same function; `test_siblings.py` and the kernel tests compare
the paths with dropout."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import amole_compile as ac
from amole_compile.kernels import triton_usable

from models import CONFIGS, VOCAB, build, build_matrix

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not triton_usable(torch.zeros(1), explicit=True)[0],
                                reason="needs triton and TRITON_INTERPRET=1 (CI sets both)")]

CASES = {  # id -> (architecture, config, dtype, batch, tokens, padded)
    "llama-adamole-linked": ("llama", dict(method="adamole", num_experts=4, rank=4, max_threshold=0.5,
                                          roles="all"), torch.float32, 2, 7, True),
    "phi3-mole-fused": ("phi3", dict(method="mole", num_experts=3, rank=2, top_k=2, roles="all"),
                        torch.float32, 2, 5, False),
    "falcon-adamole-unfolded": ("falcon_mqa", dict(method="adamole", num_experts=2, rank=4, roles="all"),
                                torch.float32, 1, 5, False),
    "gpt2-lora-conv1d": ("gpt2", dict(method="lora", rank=8, roles="all"), torch.float32, 2, 6, False),
    "neox-adamole-interleaved": ("gpt_neox", dict(method="adamole", num_experts=8, rank=1, roles="attention"),
                                 torch.float32, 3, 4, False),
    "qwen2-mole-bf16": ("qwen2", dict(method="mole", num_experts=4, rank=4, roles="attention"), torch.bfloat16,
                        2, 6, False),
}


def _model(arch: str, config: dict, dtype: torch.dtype):
    """`arch` transformed, its adapters' parameters drawn (B is zero at init, which would hide most of the op)."""
    torch.manual_seed(0)
    base = build(arch) if arch in CONFIGS else build_matrix(arch)
    model = ac.transform(base.to(dtype), ac.AdaMoLEConfig(dropout=0.0, **config))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.train()


def _step(model, inputs: dict, kernels: str) -> dict:
    """{'logits' | 'loss' | parameter name: tensor} of one forward + backward with AMOLE_KERNELS=`kernels`."""
    os.environ["AMOLE_KERNELS"] = kernels
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    if getattr(out, "loss", None) is not None:
        loss, head = out.loss, out.logits
    else:  # a base model: a fixed random projection of its hidden states
        head = out.last_hidden_state
        loss = (head.double() * torch.randn(head.shape, generator=torch.Generator().manual_seed(2),
                                            dtype=torch.float64)).sum()
    loss.backward()
    got = {"logits": head.detach(), "loss": loss.detach()}
    got.update({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    return got


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_kernels_are_as_close_to_float64_as_the_torch_path(case, monkeypatch):
    arch, config, dtype, b, s, padded = CASES[case]
    monkeypatch.setenv("AMOLE_KERNELS", "torch")
    model = _model(arch, config, dtype)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (b, s), generator=g)
    inputs = {"input_ids": ids} if arch == "falcon_mqa" else {"input_ids": ids, "labels": ids}  # (a base model)
    if padded:
        inputs["attention_mask"] = torch.ones(b, s, dtype=torch.long)
        inputs["attention_mask"][0, :2] = 0
    exact = _step(copy.deepcopy(model).double(), inputs, "torch")
    triton, torch_path = _step(model, inputs, "triton"), _step(model, inputs, "torch")
    assert exact.keys() == triton.keys() == torch_path.keys() and len(exact) > 2
    assert all(v is not None for v in (*triton.values(), *torch_path.values())), "a parameter got no gradient"
    floor = 2e-4 if dtype == torch.float32 else 4e-2
    for name, want in exact.items():
        scale = want.abs().max().clamp_min(1e-12)
        err_triton = ((triton[name].double() - want).abs().max() / scale).item()
        err_torch = ((torch_path[name].double() - want).abs().max() / scale).item()
        assert err_triton <= 10 * err_torch + floor, f"{name}: {err_triton:.2e} off float64 (torch: {err_torch:.2e})"
