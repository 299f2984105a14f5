"""A transformed model moved to the meta device runs: forward and backward for shapes, FLOP counts
(`torch.utils.flop_counter`), mixed batches. `torch.is_autocast_enabled("meta")` raises, and the adapters asked it
on every call (`modules.autocast_on` answers False for a device type without autocast).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import amole_compile as ac
from amole_compile.model.modules import autocast_on, no_autocast

from models import build, ids


@pytest.fixture(scope="module")
def adapted():
    """A tiny Llama with two adapters (dropout on, B nonzero), and its meta copy."""
    torch.manual_seed(0)
    model = ac.transform(build("llama"), ac.AdaMoLEConfig(dropout=0.05))
    ac.transform(model, ac.AdaMoLEConfig(num_experts=2), adapter_name="b")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ac.set_active_adapter(model, "default")
    return model, copy.deepcopy(model).to("meta")


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "gpt2_fused"])
def test_train_step_on_meta(adapted, fused):
    model = adapted[1]
    if fused:  # GPT-2's Conv1D q | k | v: the unfolded path, several roles
        model = ac.transform(build("gpt2"), ac.AdaMoLEConfig(dropout=0.05)).to("meta")
    batch = ids().to("meta")
    model.train()
    out = model(input_ids=batch, labels=batch)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.device.type == "meta" for g in grads)
    assert out.logits.shape == (*batch.shape, model.config.vocab_size)
    model.zero_grad(set_to_none=True)
    model.eval()


def _flops(model, x) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        out = model(input_ids=x).logits
    assert out.shape == (*x.shape, model.config.vocab_size)
    return fc.get_total_flops()


def test_eval_shapes_and_flops_match_the_real_model(adapted):
    """The adapters' FLOPs (adapted model's minus the base model's) are the same on meta as on the CPU (the base
    model's own differ: SDPA on meta decomposes into counted bmms)."""
    real, meta = adapted
    base = build("llama")
    batch = ids()
    on_cpu = _flops(real, batch) - _flops(base, batch)
    on_meta = _flops(meta, batch.to("meta")) - _flops(base.to("meta"), batch.to("meta"))
    assert on_cpu == on_meta > 0


def test_mixed_batch_on_meta(adapted):
    meta = adapted[1]
    batch = ids(3).to("meta")
    with torch.no_grad(), ac.batch_adapters(meta, ["b", "default", None]):
        assert meta(input_ids=batch).logits.shape == (3, batch.shape[1], meta.config.vocab_size)


def test_autocast_helpers():
    assert autocast_on("meta") is False
    with no_autocast("meta"):  # a null context: torch.autocast("meta") raises
        pass
    assert autocast_on("cpu") is False
    # off already: a null context, no autocast region (torch.export traced one into a wrap_with_autocast subgraph
    # in a mixed batch's graph)
    assert isinstance(no_autocast("cpu"), contextlib.nullcontext)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_on("cpu") is True
        with no_autocast("cpu"):
            assert autocast_on("cpu") is False
    with pytest.raises(RuntimeError):
        torch.is_autocast_enabled("meta")  # what the helper stands in for: if torch stops raising, simplify
