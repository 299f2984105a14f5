"""What a transformed model does for the training and saving ecosystem (HF `Trainer`, TRL, accelerate, plain
loops), installed on the model instance by `transform` / `load_adapters` and removed by `untransform`:

- **Aux loss in the model's loss** (the HF MoE way, like Mixtral's `router_aux_loss_coef`): a training-mode
  forward whose output has a `loss` gets `loss + coef * aux` and `aux_loss` (the summed aux of this forward) on
  its output. With `return_dict=False` (a tuple, loss first when labels were passed) the loss in first place
  gets `coef * aux` and the tuple keeps its length; labels but no scalar loss first warns. Under gradient
  accumulation with `num_items_in_batch` (the HF Trainer's token-normalised loss), each micro-batch's aux is
  weighted by its share of the label tokens, so that the accumulated step adds `coef * aux` once, not once per
  micro-batch. TRL's `SFTTrainer` does not use `outputs.loss`: it calls the
  model with `fused_lm_head=True` and builds its loss from `outputs.log_probs` (its `router_aux_loss_coef`
  path is Mixtral's router loss, which a dense model does not have). There the aux term rides on `log_probs`:
  an autograd function that returns them unchanged and, in backward, gives the aux loss the gradient
  `coef * (-sum of the log-probs' gradient)`. For TRL's token-mean NLL that sum is exactly this micro-batch's
  token share times whatever scale the trainer applied (accumulation, loss scaling), so the aux is weighted
  as on the Trainer path.
- **save_pretrained** writes the base model under its original key names (so that `from_pretrained(d)` is the
  base model, with its own weights) and the adapters beside it in our own files (`amole_config.json`,
  `adapters.safetensors`; `load_adapters(base, d)` restores them). Trainer checkpoints do the same.
- **load_state_dict** (Trainer resume, best-model reload) of such a checkpoint into the transformed model: the
  base keys go back under `.base_layer.`, and the adapters are read from the checkpoint directory. A state dict
  with base weights but no adapters, whose directory cannot be found, raises instead of leaving the adapters
  as they were.
- **enable_input_require_grads** (which HF's gradient checkpointing calls, and whose `requires_grad_` hook is a
  graph break under `torch.compile`) is skipped with non-reentrant checkpointing, which needs no input that
  requires grad (HF's default, `use_reentrant=False`).

The hooks are module-level functions taking the module, so `copy.deepcopy` of a transformed model carries them
over to the copy.
"""

from __future__ import annotations

import functools
import inspect
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .modules import ExpertSet
from .projection import AdaMoLELinear, ProjectionAdapters

log = logging.getLogger("amole_compile")

_STATE = "_amole_hooks"  # model.__dict__ entry: {"coef": float}


# ---- install / remove -------------------------------------------------------------------------------------------
def attach(model: nn.Module, coef: float) -> None:
    """Install the hooks on `model` (the object `transform` was given)."""
    if _STATE in model.__dict__:
        return
    state = {"coef": float(coef)}
    model.__dict__[_STATE] = state
    model.register_forward_pre_hook(_pre_forward)
    model.register_forward_hook(_post_forward, with_kwargs=True)
    model.register_load_state_dict_pre_hook(_load_pre_hook)
    if callable(getattr(type(model), "save_pretrained", None)):
        model.__dict__["save_pretrained"] = _Bound("_save_pretrained", model)
    if callable(getattr(type(model), "enable_input_require_grads", None)):
        model.__dict__["enable_input_require_grads"] = _Bound("_enable_input_require_grads", model)
        if _non_reentrant(model) and getattr(model, "_require_grads_hooks", None):
            model.disable_input_require_grads()  # checkpointing was enabled before the transform


class _Bound:
    """`model.<name>(...)` -> `<module function>(model, ...)`: unlike a bound method it pickles (by the function's
    name) and `copy.deepcopy` rebinds it to the copy."""

    def __init__(self, name: str, model: nn.Module) -> None:
        self.name, self.model = name, model

    def __call__(self, *args, **kwargs):
        return globals()[self.name](self.model, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<amole_compile {self.name.lstrip('_')} of {type(self.model).__name__}>"


def attached(model: nn.Module) -> bool:
    """Are the hooks installed on `model`?"""
    return _STATE in model.__dict__


def detach(model: nn.Module) -> None:
    """Remove what `attach` installed."""
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return
    for hooks, fn in ((model._forward_pre_hooks, _pre_forward), (model._forward_hooks, _post_forward)):
        for key in [k for k, h in hooks.items() if h is fn]:
            del hooks[key]
            model._forward_hooks_with_kwargs.pop(key, None)
    pre = model._load_state_dict_pre_hooks
    for key in [k for k, h in pre.items() if getattr(h, "hook", h) is _load_pre_hook]:
        del pre[key]
    for name in ("save_pretrained", "enable_input_require_grads"):
        model.__dict__.pop(name, None)


def aux_coef(model: nn.Module) -> float:
    """The aux-loss coefficient a transformed model adds to its loss; 0 for a model without the hooks."""
    state = model.__dict__.get(_STATE)
    return 0.0 if state is None else state["coef"]


def set_aux_coef(model: nn.Module, coef: float) -> None:
    """Change the coefficient the model adds to its loss."""
    state = model.__dict__.get(_STATE)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not transformed by amole_compile (as an nn.Module)")
    if not isinstance(coef, (int, float)) or isinstance(coef, bool) or not coef >= 0:
        raise ValueError(f"aux_loss_coef must be a finite number >= 0, got {coef!r}")
    state["coef"] = float(coef)


# ---- aux loss -----------------------------------------------------------------------------------------------------
def _sites(module: nn.Module) -> list[ExpertSet]:
    return [m for m in module.modules() if isinstance(m, ExpertSet)]


def _pre_forward(module: nn.Module, args) -> None:
    grad = torch.is_grad_enabled()
    for site in _sites(module):
        site._fwd_aux = None
        if grad:
            site._aux = None  # a forward with gradients off keeps the aux of the last one with gradients on


def _post_forward(module: nn.Module, args, kwargs, output):
    if not module.training or not isinstance(output, (Mapping, tuple)):
        return None
    values = [s._fwd_aux for s in _sites(module) if s._fwd_aux is not None]
    if not values:
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
        output["loss"] = loss + coef * _micro_batch_share(module, kwargs) * aux.to(loss.device)
    log_probs, mask = output.get("log_probs"), output.get("label_mask")
    if log_probs is not None and mask is not None and aux.requires_grad:  # TRL's fused LM head
        output["log_probs"] = _AuxOnLogProbs.apply(log_probs, mask, aux, coef)
    return output


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
    loss = loss + coef * _micro_batch_share(module, kwargs) * aux.to(loss.device)
    return (loss, *output[1:])


def _labels_given(module: nn.Module, args, kwargs) -> bool:
    if kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None:
        return True
    if not args:
        return False
    try:
        bound = inspect.signature(module.forward).bind_partial(*args)
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("labels") is not None


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


# ---- saving and loading -------------------------------------------------------------------------------------------
def split_state(model: nn.Module, state: Mapping[str, torch.Tensor], prefix: str = ""):
    """A transformed model's state dict -> (base state dict under the original key names, adapter tensors under
    the canonical `<module>.adapters.<name>.<role>.<param>` names)."""
    groups = [(n, m) for n, m in model.named_modules() if isinstance(m, ProjectionAdapters)]
    base, adapters = {}, {}
    for key, value in state.items():
        for name, mod in groups:
            p = f"{prefix}{name}."
            if key.startswith(p + "adapters."):
                adapters[key[len(prefix):]] = value
                break
            if isinstance(mod, AdaMoLELinear) and key.startswith(p + "base_layer."):
                base[p + key[len(p + "base_layer."):]] = value
                break
        else:
            base[key] = value
    return base, adapters


def _save_pretrained(self: nn.Module, save_directory, is_main_process: bool = True, state_dict=None, **kwargs):
    """`save_pretrained` of a transformed model: the base model as transformers saves it (original key names,
    loadable by `from_pretrained`) plus the adapters in `amole_config.json` / `adapters.safetensors`."""
    from .adapter_files import write_adapters

    if state_dict is None:
        state_dict = self.state_dict()
    base, adapters = split_state(self, state_dict)
    if not adapters:  # e.g. state_dict=base_state_dict(model): the adapters come from the model itself
        from .adapter_files import adapter_state

        adapters = {k: v.detach() for k, v in adapter_state(self).items()}
    adapters = {k: full_tensor(v) for k, v in adapters.items()}
    peft_flag = self.__dict__.get("_amole_peft_flag", False)  # quantized bases: see quantized.mark_trainable
    quantizer = getattr(self, "hf_quantizer", None)
    if peft_flag:
        self._hf_peft_config_loaded = False
    if quantizer is not None:  # it replaces the state dict by its own (quantization state included): rename that
        own = quantizer.get_state_dict_and_metadata

        def renamed(model, *a, **k):
            self.__dict__["state_dict"] = lambda *_a, **_k: dict(base)  # what it reads, names and metadata alike
            try:
                sd, meta = own(model, *a, **k)
            finally:
                del self.__dict__["state_dict"]
            return (base if sd is None else sd), meta

        quantizer.get_state_dict_and_metadata = renamed
    try:
        out = type(self).save_pretrained(self, save_directory, is_main_process=is_main_process, state_dict=base,
                                         **kwargs)
    finally:
        if peft_flag:
            self._hf_peft_config_loaded = True
        if quantizer is not None:
            del quantizer.get_state_dict_and_metadata
    if is_main_process:
        write_adapters(self, save_directory, adapters)
    return out


def _load_pre_hook(module: nn.Module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                   error_msgs) -> None:
    """Base-named keys of adapted layers go under `.base_layer.`; missing adapters come from the checkpoint's
    directory (found among the calling transformers/accelerate frames) or the load raises."""
    renamed = 0
    names = [n for n, m in module.named_modules() if isinstance(m, AdaMoLELinear)]
    for name in names:
        p = f"{prefix}{name}."
        for key in [k for k in state_dict if k.startswith(p)]:
            rest = key[len(p):]
            if not rest.startswith(("base_layer.", "adapters.")):
                state_dict[f"{p}base_layer.{rest}"] = state_dict.pop(key)
                renamed += 1
    if not renamed:
        return
    wanted = [f"{prefix}{k}" for k in _adapter_keys(module)]
    if any(k in state_dict for k in wanted):
        return
    directory = _checkpoint_dir()
    if directory is None:
        raise ValueError(
            f"this state dict holds {type(module).__name__}'s base weights under their original names but none "
            "of its AdaMoLE adapters: loading it would leave the adapters as they are. Load a checkpoint saved "
            "by save_pretrained with `amole_compile.load_adapters(model, dir)` (or a base model with "
            "from_pretrained(dir)), or pass the transformed model's own state_dict")
    from .adapter_files import read_adapter_tensors

    tensors = read_adapter_tensors(module, directory)
    for key, value in tensors.items():
        state_dict[f"{prefix}{key}"] = value
    log.info("loaded the adapters of %s with its base weights", directory)


def _adapter_keys(module: nn.Module) -> list[str]:
    out = []
    for name, mod in module.named_modules():
        if isinstance(mod, ProjectionAdapters):
            out += [f"{name}.adapters.{p}" if name else f"adapters.{p}" for p, _ in mod.adapters.named_parameters()]
    return out


def _checkpoint_dir(depth: int = 12) -> Path | None:
    """The directory holding `amole_config.json` that a calling transformers / accelerate frame is loading from
    (Trainer's `resume_from_checkpoint`, `best_model_checkpoint`, a sharded checkpoint's folder).

    Why a frame walk (checked against transformers 5.24): `Trainer._load_from_checkpoint` and `_load_best_model`
    hand the model only `load_state_dict(safetensors.load_file(...))`, a plain dict without the file's path or
    metadata; resuming loads the weights before the first callback event (`on_train_begin`), `TrainerState`
    holds no checkpoint path, and a callback or a Trainer subclass would be user code (the point is that a plain
    `Trainer` resumes). The PEFT branch that passes the directory (`model.load_adapter(dir)`) runs only for
    `PeftModel` instances and only when the checkpoint has no `model.safetensors`. When nothing is found, the
    load raises (see `_load_pre_hook`), so a miss is loud, never a silent drop."""
    from .adapter_files import has_adapters

    frame = inspect.currentframe()
    try:
        for _ in range(depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            if not str(frame.f_globals.get("__name__", "")).startswith(("transformers", "accelerate")):
                continue
            for value in frame.f_locals.values():
                if not isinstance(value, (str, Path)) or not str(value):
                    continue
                path = Path(value)
                for cand in (path, path.parent):
                    try:
                        if cand.is_dir() and has_adapters(cand):
                            return cand
                    except OSError:
                        continue
        return None
    finally:
        del frame


# ---- gradient checkpointing under torch.compile ---------------------------------------------------------------
def _non_reentrant(model: nn.Module) -> bool:
    funcs = [m.__dict__.get("_gradient_checkpointing_func") for m in model.modules()]
    funcs = [f for f in funcs if f is not None]
    return bool(funcs) and all(isinstance(f, functools.partial) and f.keywords.get("use_reentrant") is False
                               for f in funcs)


def _enable_input_require_grads(self: nn.Module):
    """HF's `enable_input_require_grads`, skipped under non-reentrant checkpointing: its forward hook
    (`output.requires_grad_(True)` on the embeddings) is a graph break under torch.compile, and only reentrant
    checkpointing needs inputs that require grad to reach the adapters."""
    if _non_reentrant(self):
        log.info("amole_compile: non-reentrant activation checkpointing needs no input that requires grad; "
                 "skipping enable_input_require_grads (its hook is a torch.compile graph break)")
        return None
    return type(self).enable_input_require_grads(self)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 shard) gathered to a full tensor (a collective: every rank must call); others as is."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(value, DTensor):
            return value.full_tensor()
    return value
