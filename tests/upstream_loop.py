"""The upstream loop: an independent loop-over-experts implementation of the upstream repository's layers
(`AdaMoeLayer`, `MoeLayer`, `LoraExpert`), for tests and benchmarks only, written from docs/math.md: per-expert
nn.Linear modules, a Python loop over experts, gather/scatter by the selected tokens, and its aux loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LoraExpert(nn.Module):
    def __init__(self, d_in: int, d_out: int, r: int, scale: float) -> None:
        super().__init__()
        self.lora_A = nn.Linear(d_in, r, bias=False)
        self.lora_B = nn.Linear(r, d_out, bias=False)
        self.scale = scale

    def forward(self, x):
        return self.lora_B(self.lora_A(x)) * self.scale


class LoopAdaMoLE(nn.Module):
    """method: 'adamole' | 'mole' | 'lora'. forward(x [T, D]) -> delta [T, O]; `layer_loss` set when training."""

    def __init__(self, d_in, d_out, num_experts, r, alpha, method="adamole", max_threshold=None, top_k=2):
        super().__init__()
        self.method = method
        self.experts = nn.ModuleList(LoraExpert(d_in, d_out, r, alpha / r) for _ in range(num_experts))
        self.gate = nn.Linear(d_in, num_experts, bias=False)
        self.threshold_fn = nn.Linear(d_in, 1)
        self.max_threshold = max_threshold if max_threshold is not None else 1 / num_experts
        self.top_k = top_k
        self.layer_loss = None

    def _route(self, x):
        if self.method == "adamole":
            probs = F.softmax(self.gate(x), dim=-1)
            thresholds = torch.sigmoid(self.threshold_fn(x)) * self.max_threshold
            adapted = probs - thresholds
            selected = torch.ge(adapted, 0).to(torch.float)
            weights = adapted * selected
            sums = torch.sum(weights, dim=-1, keepdim=True, dtype=x.dtype)
            sums = torch.where(sums == 0, torch.ones_like(sums), sums)
            weights = weights / sums
            return weights, selected, adapted
        logits = self.gate(x)
        top, idx = torch.topk(logits, self.top_k)
        top = F.softmax(top, dim=1, dtype=torch.float).to(x.dtype)
        weights = torch.zeros_like(logits).scatter(1, idx, top)
        selected = torch.zeros_like(logits).scatter(1, idx, 1.0)
        return weights, selected, F.softmax(logits, dim=1)

    def forward(self, x):
        if self.method == "lora":
            return self.experts[0](x)
        weights, selected, scores = self._route(x)
        out = _mix(self, weights, selected, x)
        if self.training:
            n = x.shape[0]
            fractions = selected.sum(0) / n
            probs = scores.sum(0) / n
            self.layer_loss = len(self.experts) * torch.sum(fractions * probs)
        return out



class LoopLinear(nn.Module):
    """A frozen linear plus the reference layer on dropout(x), as the reference wraps a projection (benchmarks)."""

    def __init__(self, base: nn.Linear, experts: int, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base_layer, self.drop = base, nn.Dropout(dropout)
        w = base.weight
        self.moe = LoopAdaMoLE(base.in_features, base.out_features, experts, rank, alpha).to(w.device, w.dtype)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])  # [T, D]
        return self.base_layer(x) + self.moe(self.drop(flat)).view(*x.shape[:-1], -1)

def copy_into(site, ref: LoopAdaMoLE) -> None:
    """Copy the loop implementation's weights into an ExpertSet (stacking the experts)."""
    with torch.no_grad():
        site.lora_A.copy_(torch.cat([e.lora_A.weight for e in ref.experts], 0))
        site.lora_B.copy_(torch.cat([e.lora_B.weight for e in ref.experts], 1))
        if site.gate is not None:
            site.gate.copy_(ref.gate.weight)
        if site.threshold_weight is not None:
            site.threshold_weight.copy_(ref.threshold_fn.weight)
            site.threshold_bias.copy_(ref.threshold_fn.bias)


def grads_of(site) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in site.named_parameters()}


def ref_grads(ref: LoopAdaMoLE) -> dict[str, torch.Tensor]:
    def g(t):
        return torch.zeros_like(t) if t.grad is None else t.grad

    out = {"lora_A": torch.cat([g(e.lora_A.weight) for e in ref.experts], 0),
           "lora_B": torch.cat([g(e.lora_B.weight) for e in ref.experts], 1)}
    if ref.method != "lora":
        out["gate"] = g(ref.gate.weight)
    if ref.method == "adamole":
        out["threshold_weight"] = g(ref.threshold_fn.weight)
        out["threshold_bias"] = g(ref.threshold_fn.bias)
    return out


def forward_dropped(ref: LoopAdaMoLE, x: torch.Tensor, xd: torch.Tensor) -> torch.Tensor:
    """The reference layer with the router on the undropped input x and every expert on the dropped input xd
    (one mask shared by all experts, as amole_compile draws it). x, xd [T, D] -> delta [T, O]."""
    if ref.method == "lora":
        return ref.experts[0](xd)
    weights, selected, _ = ref._route(x)
    return _mix(ref, weights, selected, xd)


def _mix(ref: LoopAdaMoLE, weights, selected, x) -> torch.Tensor:
    """The reference's loop: each expert on the tokens that selected it (gather), weighted, added back (scatter)."""
    out = torch.zeros(x.shape[0], ref.experts[0].lora_B.out_features, dtype=x.dtype, device=x.device)
    for i, expert in enumerate(ref.experts):
        idx = torch.where(selected[:, i] > 0)[0]
        if len(idx) > 0:
            out = out.index_add(0, idx, (weights[idx, i, None] * expert(x[idx])).to(out.dtype))
    return out
