"""Folding projections into the adapter op, for eager calls: `add_linears` (projections that read the same x, with
their adapters, in one autograd node: `kernels.op_linear`), the dropout masks it draws (`drop_masks`), and the
results one sibling computed for the others, held until their calls (`Held`, in the `HELD` context variable: per
thread and context, never on a module).

Legend: T tokens, D in features, O out features, S sites.
"""

from __future__ import annotations

import contextvars
import dataclasses

import torch
from torch import Tensor

from ..kernels import adapter_linears


def add_linears(x: Tensor, folds: list) -> list[tuple[Tensor, list]]:
    """x [..., D] -> per (group, weight, bias): (F.linear(x, weight, bias) + its roles' deltas [..., O], its sites'
    (scores, mask, aux)), all in one autograd node (`kernels.op_linear.adapter_linears`): projections that read
    the same x, as an attention block's q, k and v. The sites draw their dropout masks in order; nothing is
    recorded (the caller records each group's outputs with `AdapterGroup.record_outs`)."""
    sites = [s for g, _, _ in folds for s in g.values()]
    masks = iter(drop_masks(sites, x))
    projections = [([s.op_args(x, next(masks), None) for s in g.values()], w, b) for g, w, b in folds]
    return adapter_linears(projections)


def drop_masks(sites: list, x: Tensor) -> list[Tensor | None]:
    """Each site's dropout keep-mask on x [..., D] (`ExpertSet.drop_mask`); where two or more sites drop alike in one
    launch (the same rate, `bernoulli_`), one draw [S, ..., D] for all of them, each site's mask a view of it in
    order (the kernels then read them as one stacked tensor, `kernels.op_linear`)."""
    rates = {s.dropout for s in sites}
    if len(sites) > 1 and len(rates) == 1 and all(s.drops() and s.one_launch_mask(x) for s in sites):
        draw = torch.empty((len(sites), *x.shape), device=x.device, dtype=torch.bool).bernoulli_(1.0 - rates.pop())
        return list(draw.unbind(0))
    return [s.drop_mask(x) for s in sites]


@dataclasses.dataclass(eq=False)
class Held:
    """Results computed for siblings ahead of their own calls (`AdaMoLELinear._fold_siblings`): for x at
    `version` with gradients on or off (`grad`), per holder (by id) (holder, its active group, that group's
    training mode, y [..., O], the sites' (scores, mask, aux)). One per thread and context (`HELD`); the next fold of
    siblings replaces it."""

    x: Tensor
    version: int
    grad: bool
    results: dict

    def take(self, holder, x: Tensor, group) -> Tensor | None:
        """`holder`'s held y for its call on x (recording its statistics and aux now), or None: none held, or x
        changed in place since, another gradient mode, another active adapter or training mode. Taken once."""
        entry = self.results.pop(id(holder), None)
        if not self.results:
            HELD.set(None)
        if entry is None:
            return None
        who, g, training, y, outs = entry
        if (who is not holder or g is not group or g.training != training or x._version != self.version
                or torch.is_grad_enabled() != self.grad):
            return None
        g.record_outs(x, outs)
        return y


HELD: contextvars.ContextVar[Held | None] = contextvars.ContextVar("amole_held_siblings", default=None)
