"""One site's auxiliary (load-balancing) loss, docs/math.md:

    aux = E * sum_e mean_t(mask[t, e]) * mean_t(scores[t, e])  =  E / T^2 * dot(sum_t mask, sum_t scores)

as an autograd function with few launches per training step (issue 21: what the GPU waits for is the host): the
forward is 4 ops (the mask's column sums scaled, the scores' column sums, a dot) instead of 6, and the backward,
d aux / d scores[t, e] = E * mean_t(mask[:, e]) / T for every t, is one product and its [T, E] copy instead of 4
ops. The mask takes no gradient (it is a comparison).

Legend: T tokens, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _Aux(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: Tensor, mask: Tensor, num_experts: int) -> Tensor:
        t = scores.shape[0]
        w = mask.sum(0, dtype=scores.dtype).mul_(num_experts / (t * t))  # [E]: E * mean_t(mask) / T
        ctx.save_for_backward(w)
        ctx.tokens = t
        return torch.dot(w, scores.sum(0))  # []

    @staticmethod
    def backward(ctx, grad: Tensor):
        (w,) = ctx.saved_tensors
        return (grad * w).expand(ctx.tokens, -1), None, None  # [T, E], the same row for every token


def aux_loss(scores: Tensor, mask: Tensor, num_experts: int) -> Tensor:
    """scores [T, E] float, mask [T, E] bool (T > 0) -> the site's aux loss [] (see the module doc). Under
    torch.compile the plain formula: inductor fuses it, and dynamo cannot keep an autograd.Function's output
    that a checkpointed region stores on a module (its graph loses the node)."""
    if torch.compiler.is_compiling():
        t = scores.shape[0]
        return torch.dot(mask.sum(0, dtype=scores.dtype), scores.sum(0)) * (num_experts / (t * t))
    return _Aux.apply(scores, mask, num_experts)
