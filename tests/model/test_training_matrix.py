"""Every architecture of the matrix (`tests/models.py`) takes a training step once transformed, its attention and
MLP projections adapted: forward in training mode with dropout, backward, a finite gradient on every trainable
parameter. What the model does with a projection's output is its own business: Falcon's MLP adds the attention
output into it in place (`mlp_output += attention_output`), which a view output of our op could not take."""

from __future__ import annotations

import pytest
import torch

import amole_compile as ac
from amole_compile.passes.capture import synthesize_inputs

from models import MATRIX, build_matrix

# Their feed-forward blocks are mixtures of experts (3-D expert weights, or data-dependent dispatch): MLP roles are
# refused with a ValueError naming why (`tests/passes`), so they train their attention projections only.
MOE = {"dbrx_moe", "gpt_oss_sinks", "mixtral_moe", "qwen3_moe"}


def _loss(out) -> torch.Tensor:
    """The model's loss, or the mean square of its first floating output (a base model)."""
    if getattr(out, "loss", None) is not None:
        return out.loss
    first = next(v for v in out.to_tuple() if isinstance(v, torch.Tensor) and v.is_floating_point())
    return first.float().square().mean()


@pytest.mark.parametrize("arch", sorted(MATRIX))
def test_every_architecture_trains(arch):
    torch.manual_seed(0)
    model = build_matrix(arch)
    inputs = synthesize_inputs(model)
    roles = "attention" if arch in MOE else "all"
    ac.transform(model, ac.AdaMoLEConfig(num_experts=2, rank=2, dropout=0.1, roles=roles))
    model.train()
    _loss(model(**inputs)).backward()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all(".adapters." in n for n in params)
    missing = [n for n, p in params.items() if p.grad is None or not p.grad.isfinite().all()]
    assert missing == [], missing
    # B starts at zero, so A's gradient is zero at the first step; B's is not, at every site
    dead = [n for n, p in params.items() if n.endswith("lora_B") and not p.grad.any()]
    assert dead == [], dead
