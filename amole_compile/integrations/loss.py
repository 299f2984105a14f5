"""The aux loss in the model's own loss, for HF `Trainer`, TRL and plain loops alike: two forward hooks on the
transformed model (rows of `patches.py`).

- A training-mode forward whose output has a `loss` gets `loss + coef * aux` and `aux_loss` (the summed aux of
  this forward) on its output, the HF MoE way (Mixtral's `router_aux_loss_coef`). With `return_dict=False` (a
  tuple, loss first when labels were passed) the loss in first place gets `coef * aux` and the tuple keeps its
  length; labels but no scalar loss first warns.
- Under gradient accumulation with `num_items_in_batch` (the HF Trainer's token-normalised loss), each
  micro-batch's aux is weighted by its share of the label tokens, so that the accumulated step adds
  `coef * aux` once, not once per micro-batch.
- TRL's `SFTTrainer` does not use `outputs.loss`: it calls the model with `fused_lm_head=True` and builds its
  loss from `outputs.log_probs` (its `router_aux_loss_coef` path is Mixtral's router loss, which a dense model
  does not have). There the aux term rides on `log_probs`: an autograd function that returns them unchanged
  and, in backward, gives the aux loss the gradient `coef * (-sum of the log-probs' gradient)`. For TRL's
  token-mean NLL that sum is exactly this micro-batch's token share times whatever scale the trainer applied
  (accumulation, loss scaling), so the aux is weighted as on the Trainer path.

Lifetime of the aux tensors: each site keeps this forward's value (`ExpertSet._fwd_aux`) until the post-forward
hook has summed it, which then clears it; and the value of the last training forward with gradients on
(`ExpertSet._aux`, read by `amole_compile.aux_loss`) until the next training forward with gradients on or an
eval forward with gradients on. Copies and pickles of the model leave both out.

The coefficient is the model's record's (`model/state.py`); the hooks are module-level functions, so a copy of
the model carries them and they act on the copy.
"""

from __future__ import annotations

import contextvars
import inspect
import warnings
import weakref
from collections.abc import Mapping

import torch
from torch import nn

from ..model import tokens
from ..model.modules import ExpertSet, expert_sets
from ..model.state import state_of


def aux_coef(model: nn.Module) -> float:
    """The aux-loss coefficient a transformed model adds to its loss; 0 for a model without a record."""
    record = state_of(model)
    return 0.0 if record is None else record.aux_coef


def set_aux_coef(model: nn.Module, coef: float) -> None:
    """Change the coefficient the model adds to its loss."""
    record = state_of(model)
    if record is None:
        raise ValueError(f"{type(model).__name__} is not transformed by amole_compile (as an nn.Module)")
    if not isinstance(coef, (int, float)) or isinstance(coef, bool) or not coef >= 0:
        raise ValueError(f"aux_loss_coef must be a finite number >= 0, got {coef!r}")
    record.aux_coef = float(coef)


# ---- aux loss -----------------------------------------------------------------------------------------------------
def pre_forward(module: nn.Module, args, kwargs) -> None:
    """Forget the last forward's per-forward aux (and, with gradients on, the aux `aux_loss` reads); put the
    forward's attention mask in the call's context (the expert statistics count its real tokens only:
    `model/tokens.py`)."""
    tokens.enter(kwargs.get("attention_mask") if len(args) < 2 else _argument(module, "attention_mask", args, kwargs))
    # a forward with gradients off keeps the aux of the last one with gradients on
    ExpertSet.forget_aux(_entering(module), torch.is_grad_enabled(), summing=True)


def post_forward(module: nn.Module, args, kwargs, output):
    """Put this forward's aux loss into the output's loss (see the module doc); clear the per-forward values."""
    tokens.leave()
    sites = _leaving(module)
    values = [s._fwd_aux for s in sites if s._fwd_aux is not None]
    ExpertSet.forget_aux(sites, False)  # summed below: no graph stays on the modules for this
    if not module.training or not isinstance(output, (Mapping, tuple)) or not values:
        return None
    aux = torch.stack(values).sum()
    if isinstance(output, tuple):
        return _post_forward_tuple(module, args, kwargs, output, aux)
    coef = aux_coef(module)
    if output.get("aux_loss") is None:  # a MoE model's own router loss keeps its place
        output["aux_loss"] = aux
    else:
        output["amole_aux_loss"] = aux
    if not coef:
        return output
    loss = output.get("loss")
    if loss is not None:
        _check_trains(module, loss, aux)
        output["loss"] = loss + coef * _micro_batch_share(module, kwargs) * aux.to(loss.device)
    log_probs, mask = output.get("log_probs"), output.get("label_mask")
    if log_probs is not None and mask is not None and aux.requires_grad:  # TRL's fused LM head
        output["log_probs"] = _AuxOnLogProbs.apply(log_probs, mask, aux, coef)
    return output


# The sites the pre-hook found, for the forward hook of the same eager forward: one walk of the model per forward
# (~1 us a module) instead of two. A stack, as forwards nest; the model is held weakly. The forward hook runs
# also when the forward raises (`always_call`), so entries pair up; one left by a path that skipped it (a
# compiled forward that raised) goes when its model's next forward, or an outer one, leaves. Under
# torch.compile (which cannot trace a ContextVar) both hooks walk, at trace time only.
_WALKED: contextvars.ContextVar[tuple[tuple[weakref.ref, list], ...]] = contextvars.ContextVar("amole_walked",
                                                                                             default=())


def _entering(module: nn.Module) -> list:
    """The sites of `module`, remembered for `_leaving`."""
    sites = expert_sets(module)
    if not torch.compiler.is_compiling():
        stack = tuple(e for e in _WALKED.get() if e[0]() is not None and e[0]() is not module)  # none stale
        _WALKED.set((*stack, (weakref.ref(module), sites)))
    return sites


def _leaving(module: nn.Module) -> list:
    """The sites `_entering` found for this forward of `module` (the entries above it, left by forwards that
    never left, go too); walked again where it has no entry."""
    if not torch.compiler.is_compiling():
        stack = _WALKED.get()
        for i in range(len(stack) - 1, -1, -1):
            if stack[i][0]() is module:
                _WALKED.set(stack[:i])
                return stack[i][1]
    return expert_sets(module)


def _post_forward_tuple(module: nn.Module, args, kwargs, output: tuple, aux: torch.Tensor):
    """`return_dict=False`: with labels given, the tuple's first element is the loss and gets `coef * aux` (the
    tuple keeps its length; the aux value stays readable with `aux_loss(model)`). Labels given but no scalar
    loss first: warn, since the aux would not reach the loss."""
    coef = aux_coef(module)
    if not coef or not _labels_given(module, args, kwargs):
        return None
    loss = output[0] if output else None
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.is_floating_point()):
        warnings.warn(f"amole_compile: {type(module).__name__} returned a tuple without a scalar loss first "
                      "although labels were passed, so its AdaMoLE aux loss was not added: call it with "
                      "return_dict=True, or add `aux_loss_coef * amole_compile.aux_loss(model)` yourself",
                      RuntimeWarning, stacklevel=2)
        return None
    _check_trains(module, loss, aux)
    loss = loss + coef * _micro_batch_share(module, kwargs) * aux.to(loss.device)
    return (loss, *output[1:])


class AuxWithoutGradientWarning(UserWarning):
    """A training forward's loss takes gradients but its aux loss has none: the routers get no load-balancing
    gradient (reentrant activation checkpointing runs the layers without gradients)."""


def _check_trains(module: nn.Module, loss: torch.Tensor, aux: torch.Tensor) -> None:
    """Warn where the aux term joins a loss that takes gradients but carries none itself, while some router
    trains (eager only)."""
    if torch.compiler.is_compiling() or not loss.requires_grad or aux.requires_grad:
        return
    routers = [p for site in expert_sets(module) for p in (site.gate, site.threshold_weight, site.threshold_bias)]
    if any(p is not None and p.requires_grad for p in routers):
        warnings.warn(f"amole_compile: {type(module).__name__}'s AdaMoLE aux loss has no gradient in this training "
                      "forward although its loss has one (reentrant activation checkpointing runs the layers without "
                      "gradients), so the routers get no load-balancing gradient: use gradient_checkpointing_kwargs="
                      "{'use_reentrant': False}", AuxWithoutGradientWarning, stacklevel=3)


def _labels_given(module: nn.Module, args, kwargs) -> bool:
    if kwargs.get("shift_labels") is not None:
        return True
    return _argument(module, "labels", args, kwargs) is not None


def _argument(module: nn.Module, name: str, args, kwargs):
    """The forward's argument `name`, passed by keyword or by position (None when not passed)."""
    if name in kwargs or not args:
        return kwargs.get(name)
    try:
        bound = inspect.signature(module.forward).bind_partial(*args)
    except (TypeError, ValueError):
        return None
    return bound.arguments.get(name)


class _AuxOnLogProbs(torch.autograd.Function):
    """log_probs unchanged; backward also gives `aux` the gradient `coef * (-sum of grad over labelled tokens)`,
    i.e. `coef * token share * the trainer's scale` for a token-mean NLL over the log-probs."""

    @staticmethod
    def forward(ctx, log_probs, mask, aux, coef):
        ctx.save_for_backward(mask)
        ctx.coef = coef
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return log_probs.view_as(log_probs)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        shape, dtype, device = ctx.aux_meta
        weight = -(grad * mask.to(grad.dtype)).sum()
        return grad, None, (ctx.coef * weight).to(device=device, dtype=dtype).expand(shape), None


def _micro_batch_share(module: nn.Module, kwargs: dict):
    """1, or under the Trainer's token-normalised gradient accumulation (`num_items_in_batch` passed to the
    forward) this micro-batch's label tokens over the accumulated batch's, as the task loss is weighted."""
    total = kwargs.get("num_items_in_batch")
    labels = kwargs.get("shift_labels")
    if labels is None:
        labels = kwargs.get("labels")
        if labels is not None and "CausalLM" in type(module).__name__:
            labels = labels[..., 1:]
    if total is None or labels is None or not isinstance(labels, torch.Tensor):
        return 1.0
    total = torch.as_tensor(total, device=labels.device)
    return labels.ne(-100).sum() / total.clamp(min=1)


