"""Helpers for the ONNX tests: adapted tiny models with adapters that matter, tie-free routing checks, and the
HF reference logits (position ids as HF generate computes them)."""

from __future__ import annotations

import torch

import amole_compile as ac
from amole_compile.kernels import adapter
from amole_compile.model.modules import ExpertSet

from models import build

ATOL = 1e-4  # fp32 logits; ORT matches PyTorch to ~3e-7 here, so this can fail
TIE_MARGIN = 1e-6  # ORT and PyTorch differ by ~1e-8 in the routing scores; closer to a tie could flip


def randomise(model: torch.nn.Module, seed: int = 0, router_gain: float = 3.0) -> torch.nn.Module:
    """Nonzero lora_B (normal * 0.05) so adapters matter; a stronger router so routing varies per token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in sites(model):
            site.lora_B.copy_(torch.randn(site.lora_B.shape, generator=g) * 0.05)
            if site.gate is not None:
                site.gate.mul_(router_gain)
            if site.threshold_weight is not None:
                site.threshold_weight.mul_(router_gain)
    return model


def adapted(arch: str, method: str = "adamole", seed: int = 0, layers: int = 2, **config) -> torch.nn.Module:
    """A tiny model (`layers` deep: one layer halves the export time) with randomised adapters, in eval mode."""
    torch.manual_seed(seed)
    depth = {"n_layer": layers} if arch == "gpt2" else {"num_hidden_layers": layers}
    model = ac.transform(build(arch, **depth), ac.AdaMoLEConfig(method=method, **config))
    return randomise(model, seed).eval()


def sites(model: torch.nn.Module) -> list[ExpertSet]:
    return [m for m in model.modules() if isinstance(m, ExpertSet)]


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def reference_logits(model, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PyTorch logits with HF generate's position ids (what OnnxLM feeds)."""
    kw = {"position_ids": positions(mask)} if getattr(model, "can_generate", lambda: False)() else {}
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask, **kw).logits


def routing(model, input_ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
    """(mask [T, E], decision margin) for every site over the real (unpadded) tokens, from the op's own outputs.

    Padded tokens are left out: their outputs reach no real token, and some are exact ties (an all-masked
    attention row gives o_proj a zero input, so every gate logit is 0)."""
    found, real = [], mask.reshape(-1).bool()

    def hook(site, args, _out):
        x = args[0].reshape(-1, args[0].shape[-1])[real]  # [T, D]: a site takes x [..., D]
        _, scores, m, _, zr, *_ = adapter(x, None, site.lora_A, site.lora_B, site.gate, site.threshold_weight,
                                      site.threshold_bias, None, site.method, site.num_experts, site.top_k,
                                      site.scale, site.max_threshold, 1.0, "torch")
        if site.method == "adamole":
            margin = scores.abs().min().item()  # a = p - tau; a tie is a == 0
        else:
            top = zr.topk(site.top_k + 1, dim=-1).values
            margin = (top[:, -2] - top[:, -1]).min().item()
        found.append((m, margin))

    handles = [s.register_forward_hook(hook) for s in sites(model)]
    try:
        reference_logits(model, input_ids, mask)
    finally:
        for h in handles:
            h.remove()
    return found


def assert_routing_varied(model, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Experts are really masked for some tokens and not others, and no decision sits near a tie."""
    found = routing(model, input_ids, mask)
    assert found, "no adapter site ran"
    masks = [m for m, _ in found]
    assert all(bool(m.any()) for m in masks), "some site selected no expert at all"
    assert any(bool((~m).any()) for m in masks), "no expert was ever masked"
    if input_ids.numel() > 1:
        assert any(bool((m != m[:1]).any()) for m in masks), "routing is the same for every token"
    worst = min(margin for _, margin in found)
    assert worst > TIE_MARGIN, f"routing has a near-tie (margin {worst:.2e}); pick other inputs"


def assert_logits_close(ref: torch.Tensor, got, mask: torch.Tensor, atol: float = ATOL) -> None:
    """Compare on real (unpadded) tokens; padded positions' logits are undefined."""
    got = torch.as_tensor(got)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    keep = mask.bool()
    err = (ref[keep] - got[keep]).abs().max().item()
    assert err <= atol, f"max |PyTorch - ORT| = {err:.3e} > {atol}"


def batch(b: int, s: int, seed: int, pad: dict[int, int] | None = None, vocab: int = 128):
    """input_ids [b, s] and a mask with pad[row] left-padding tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    for row, n in (pad or {}).items():
        mask[row, :n] = 0
        ids[row, :n] = 0
    return ids, mask


SHAPES = [(1, 1, None), (3, 23, {0: 4, 2: 9}), (1, 64, None)]  # (batch, seq, left padding): not the example's
