"""What a site keeps of its forwards (`Records`, a mixin of `modules.ExpertSet`): the aux loss of the current
and of the last trained forward, for the model's loss hooks (`integrations/loss.py`) and `aux_loss`, and the
expert statistics counters.

Legend: T tokens, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .tokens import real_tokens


def _recomputing() -> bool:
    """Inside autograd's backward, i.e. activation checkpointing re-running the forward (eager only; compiled
    checkpointing does not replay side effects)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class Records:
    """The aux terms and statistics of an `ExpertSet` (which holds the attributes these methods read: `training`,
    `gate`, `num_experts`, `track_stats`, `stat_passes` and the three `stat_*` buffers)."""

    _summing = False  # inside a model's forward: calls' aux terms add up (`_summed`); set by the loss hooks

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the last forward's aux loss (an autograd graph's output, which neither
        deep-copies nor pickles): a copy starts with none recorded."""
        state = dict(self.__dict__)
        state["_aux"] = state["_fwd_aux"] = None
        state.pop("_summing", None)
        return state

    def record(self, scores: Tensor, mask: Tensor, tokens: Tensor | None = None,
               counts: tuple[Tensor, Tensor, Tensor] | None = None, lead: tuple[int, ...] | None = None,
               aux: Tensor | None = None, rows: int = 0) -> None:
        """Keep this forward's aux loss (training mode, a router, at least one token) as `forward_aux`, and as
        `aux` when gradients are on: a forward with gradients off (an evaluation or metrics pass inside a
        training step) never replaces the aux of the forward being trained. Activation checkpointing's
        recompute records nothing. Add the routing to the expert statistics (not while exporting, nor when
        checkpointing recomputes), for the passes `stat_passes` names. `tokens` [T] bool: only those tokens are
        this site's (a mixed batch); `counts`: this site's statistics counted by the caller (tokens [], selected
        [E], active [E + 1]); `lead`: the input's leading shape, whose padding tokens are not counted
        (`tokens.real_tokens`, `rows` saying which of its dimensions holds the batch); `aux`: the aux loss the
        op computed (`with_aux`), required without `tokens`."""
        recomputing = _recomputing()
        if self.training and self.gate is not None and (tokens is not None or scores.shape[0] > 0):
            # computed in the recompute too: checkpointing checks that it saves the same tensors
            if tokens is None:
                if aux is None or aux.numel() != 1:
                    raise RuntimeError("record: a training forward of a site with a gate needs the op's aux loss "
                                       "(call the op with with_aux=site.wants_aux())")
                value = aux
            else:  # a mixed batch: the means over this site's own rows' tokens
                value = self.num_experts * (_token_mean(mask.to(scores.dtype), tokens)
                                            * _token_mean(scores, tokens)).sum()
            if not recomputing:
                self.keep_aux(self._summed(value), torch.is_grad_enabled())
        elif not recomputing and not self._summing:  # (in a model's forward, a call without one adds nothing)
            grad = torch.is_grad_enabled()
            if self._fwd_aux is not None or (grad and self._aux is not None):
                self.keep_aux(None, grad)
        if self.counting() and not recomputing:
            if counts is None:
                real = None if lead is None else real_tokens(lead, rows)
                self._count(mask, real if tokens is None else tokens if real is None else tokens & real)
            else:
                with torch.no_grad():
                    for buf, value in zip((self.stat_tokens, self.stat_selected, self.stat_active), counts,
                                          strict=True):
                        buf.add_(value)

    def _summed(self, value: Tensor) -> Tensor:
        """`value`, plus the terms this site recorded earlier in the same model forward (`_summing`, set by the
        model's loss hooks): a site called more than once in a forward, as a layer shared by several blocks
        (ALBERT's), adds one term per call, as if each call were its own layer. Outside a model's forward (a
        submodule called by itself), each call's term replaces the last."""
        earlier = self._fwd_aux if self._summing else None
        if earlier is None:
            return value
        with torch.enable_grad():  # (a call under no_grad must not cut the earlier terms' graph)
            return earlier + value

    def counting(self) -> bool:
        """Does this forward add to the statistics (tracked, not exporting, a pass `stat_passes` names)?"""
        if not self.track_stats or torch.compiler.is_exporting():
            return False
        passes = getattr(self, "stat_passes", "all")  # a site pickled before the setting counted every pass
        return passes == "all" or (passes == "train") == self.training

    def _count(self, mask: Tensor, tokens: Tensor | None) -> None:
        # In place (`+=` would re-assign the module attribute), and by index_add_ so that no size of a
        # buffer is compared with the batch's: under dynamic=True a buffer's length can share a symbol
        # with an equal sequence length, and a size check would then specialise that length.
        with torch.no_grad():
            if tokens is not None:
                mask = mask & tokens[:, None]
            active = mask.sum(-1)  # [T] experts active per token
            experts = torch.arange(mask.shape[1], device=mask.device)
            self.stat_tokens.add_(mask.shape[0] if tokens is None else tokens.sum())
            self.stat_selected.index_add_(0, experts, mask.sum(0))
            self.stat_active.index_add_(0, active, torch.ones_like(active) if tokens is None else tokens.long())

    def clear_aux(self) -> None:
        """Forget the recorded aux loss (e.g. before a capture, so that it has no side effect)."""
        self.keep_aux(None, True)

    def keep_aux(self, value: Tensor | None, grad: bool) -> None:
        """This forward's aux loss is `value` (None: none); with `grad` (gradients on) it is also the `aux` read
        later. Plain instance attributes, written past `nn.Module.__setattr__` (which looks for a parameter,
        buffer or submodule of the name first, ~10x the host time: three times per site and step); under
        torch.compile as attributes, which dynamo records as side effects."""
        if torch.compiler.is_compiling():
            self._fwd_aux = value
            if grad:
                self._aux = value
            return
        self._keep_aux_eager(value, grad)

    def _keep_aux_eager(self, value: Tensor | None, grad: bool) -> None:
        """`keep_aux` outside torch.compile: the instance dict written directly."""
        state = self.__dict__
        state["_fwd_aux"] = value
        if grad:
            state["_aux"] = value

    @staticmethod
    def forget_aux(sites: list[Records], grad: bool, summing: bool = False) -> None:
        """`keep_aux(None, grad)` on each of `sites`, asking once whether this runs under torch.compile (the
        loss hooks clear every site of a model twice per forward); `summing`: a model forward starts, whose calls
        of a site add up (`_summed`), or (False) it ends."""
        if torch.compiler.is_compiling():
            for site in sites:
                site.keep_aux(None, grad)
                site._summing = summing
            return
        for site in sites:
            site._keep_aux_eager(None, grad)
            site.__dict__["_summing"] = summing

    def reset_stats(self) -> None:
        """Zero the expert statistics counters."""
        for buf in (self.stat_tokens, self.stat_selected, self.stat_active):
            buf.zero_()

    @property
    def aux(self) -> Tensor | None:
        """The aux loss recorded by the last training-mode forward (None if none)."""
        return self._aux


def _token_mean(v: Tensor, tokens: Tensor | None) -> Tensor:
    """v [T, E] -> its mean over the tokens [E] (over those marked in `tokens` [T] bool; 0 when none)."""
    if tokens is None:
        return v.mean(0)
    w = tokens.to(v.dtype)[:, None]
    return (v * w).sum(0) / w.sum().clamp(min=1)
