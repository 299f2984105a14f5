"""Hugging Face workflows on a transformed model: the base checkpoint, the training loss and the `Trainer`.

    model.save_pretrained(d, state_dict=base_state_dict(model))   # the plain base model, original key names
    save_adapters(model, d)                                         # the adapters beside it
    loss = compute_loss(model, batch)                               # task loss + 1e-3 * aux_loss
    AdaMoLETrainer(model=model, args=args, train_dataset=ds).train()

Every helper accepts the model as the training loop holds it: wrapped by DDP (`.module`), by `torch.compile`
(`._orig_mod`) or sharded in place by FSDP2 (`fully_shard`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .core import aux_loss
from .modules import AdaMoLELinear, AdapterGroup

DEFAULT_AUX_COEF = 1e-3


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / FSDP1 (`.module`) and torch.compile (`._orig_mod`) wrappers.

    FSDP2 (`fully_shard`) shards the module in place and is returned as is.
    """
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or \
                type(model).__name__ == "FullyShardedDataParallel":
            model = model.module
        else:
            return model


def _full(value: Tensor) -> Tensor:
    """A DTensor (FSDP2 shard) gathered to a full tensor (a collective: every rank must call); others as is."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(value, DTensor):
            return value.full_tensor()
    return value


def _renames(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """(key prefixes to drop: the adapters, prefix renames: `<m>.base_layer.` -> `<m>.`)."""
    drop, rename = [], {}
    for name, mod in model.named_modules():
        if isinstance(mod, AdapterGroup):
            prefix = f"{name}." if name else ""
            drop.append(f"{prefix}adapters.")
            if isinstance(mod, AdaMoLELinear):
                rename[f"{prefix}base_layer."] = prefix
    return drop, rename


def _base_key(key: str, drop: list[str], rename: dict[str, str]) -> str | None:
    if any(key.startswith(p) for p in drop):
        return None
    for old, new in rename.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The base model's state dict with its original key names: `<m>.base_layer.<p>` becomes `<m>.<p>` and the
    adapters' entries are dropped, so that

        model.save_pretrained(d, state_dict=base_state_dict(model))

    writes a checkpoint `AutoModel...from_pretrained(d)` loads as the plain base model. Under FSDP2 the shards are
    gathered into full tensors, a collective: call it on every rank (and save on rank 0 only).
    """
    model = unwrap(model)
    drop, rename = _renames(model)
    out = {}
    for key, value in model.state_dict().items():
        new = _base_key(key, drop, rename)
        if new is not None:
            out[new] = _full(value)
    return out


def compute_loss(model: nn.Module, inputs: dict, aux_coef: float = DEFAULT_AUX_COEF,
                 return_outputs: bool = False) -> Tensor | tuple[Tensor, object]:
    """`model(**inputs).loss + aux_coef * aux_loss(model)` (and the outputs when `return_outputs`).

    Call the wrapper the loop trains (DDP, torch.compile): the forward runs through it, the aux loss is read from
    the module underneath. With data parallelism each rank's aux loss is that of its own shard of the batch.
    """
    outputs = model(**inputs)
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs[0]
    if loss is None:
        raise ValueError("the model returned no loss: pass `labels` in inputs")
    loss = loss + aux_coef * aux_loss(unwrap(model))
    return (loss, outputs) if return_outputs else loss


def _trainer_class():
    from transformers import Trainer

    class AdaMoLETrainer(Trainer):
        """A `transformers.Trainer` whose loss adds `aux_coef * aux_loss(model)` (AdaMoLE's load-balancing loss).

        `AdaMoLETrainer(model=..., args=..., train_dataset=..., aux_coef=1e-3)`; every other argument is the
        Trainer's. The aux loss of each micro-batch is scaled for gradient accumulation the same way the Trainer
        scales the task loss, and is not multiplied by the number of processes (data parallelism averages it).
        """

        def __init__(self, *args, aux_coef: float = DEFAULT_AUX_COEF, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.aux_coef = float(aux_coef)

        def _task_loss_scaled_for_ga(self, num_items_in_batch) -> bool:
            """Mirror of `Trainer.training_step`'s test: is the task loss already normalised over the whole
            accumulated batch (so the Trainer will not divide it by the accumulation steps)?"""
            if getattr(self, "loss_is_scaled_for_ga", None) is not None:
                return bool(self.loss_is_scaled_for_ga)
            return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                        or self.compute_loss_func is not None)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """The Trainer's loss plus `aux_coef * aux_loss(model)`, scaled for gradient accumulation alike."""
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            aux = aux_loss(unwrap(model))
            if self._task_loss_scaled_for_ga(num_items_in_batch):
                aux = aux / getattr(self, "current_gradient_accumulation_steps", 1)
            loss = loss + self.aux_coef * aux
            return (loss, outputs) if return_outputs else loss

    AdaMoLETrainer.__module__, AdaMoLETrainer.__qualname__ = __name__, "AdaMoLETrainer"
    return AdaMoLETrainer


def __getattr__(name: str):
    if name == "AdaMoLETrainer":  # transformers.Trainer (and accelerate) load on first use
        cls = _trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
