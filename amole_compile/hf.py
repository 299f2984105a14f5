"""Hugging Face workflows on a transformed model: the base checkpoint, the training loss and the `Trainer`.

    model.save_pretrained(d)              # the base model (original key names) + amole_config.json/adapters.safetensors
    base = AutoModelForCausalLM.from_pretrained(d)   # the base model, its own weights
    load_adapters(base, d)                # the trained model
    Trainer(model=model, args=args, train_dataset=ds).train()   # the model's loss holds coef * aux
    SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds).train()   # through router_aux_loss_coef

`base_state_dict(model)` is the base model's state dict with the original key names (what save_pretrained
writes). `compute_loss` and `AdaMoLETrainer` are kept for old code; neither is needed any more.

Every helper accepts the model as the training loop holds it: wrapped by DDP (`.module`), by `torch.compile`
(`._orig_mod`) or sharded in place by FSDP2 (`fully_shard`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import model_hooks
from .config import DEFAULT_AUX_LOSS_COEF as DEFAULT_AUX_COEF  # noqa: F401 (old name)


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


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The base model's state dict with its original key names: `<m>.base_layer.<p>` becomes `<m>.<p>` and the
    adapters' entries are dropped, so that

        model.save_pretrained(d, state_dict=base_state_dict(model))

    writes a checkpoint `AutoModel...from_pretrained(d)` loads as the plain base model. Under FSDP2 the shards are
    gathered into full tensors, a collective: call it on every rank (and save on rank 0 only).
    """
    model = unwrap(model)
    base, _ = model_hooks.split_state(model, model.state_dict())
    return {k: model_hooks.full_tensor(v) for k, v in base.items()}


def compute_loss(model: nn.Module, inputs: dict, aux_coef: float | None = None,
                 return_outputs: bool = False) -> Tensor | tuple[Tensor, object]:
    """The training loss of a transformed model: `model(**inputs).loss` (and the outputs when `return_outputs`).

    The model's loss already holds `AdaMoLEConfig.aux_loss_coef * aux` (see `model_hooks`), so this adds
    nothing. `aux_coef` is kept for old callers: None or the model's own coefficient; another value raises
    (set it with `AdaMoLEConfig(aux_loss_coef=...)`). Call the wrapper the loop trains (DDP, torch.compile).
    """
    inner = unwrap(model)
    if aux_coef is not None and abs(float(aux_coef) - model_hooks.aux_coef(inner)) > 1e-12:
        raise ValueError(f"compute_loss(aux_coef={aux_coef}): the model adds aux_loss_coef="
                         f"{model_hooks.aux_coef(inner)} to its own loss; set the coefficient with "
                         "AdaMoLEConfig(aux_loss_coef=...) when transforming")
    outputs = model(**inputs)
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs[0]
    if loss is None:
        raise ValueError("the model returned no loss: pass `labels` in inputs")
    return (loss, outputs) if return_outputs else loss


def _trainer_class():
    from transformers import Trainer

    class AdaMoLETrainer(Trainer):
        """Retired: a plain `transformers.Trainer` now trains AdaMoLE with its aux loss, because a transformed
        model adds `AdaMoLEConfig.aux_loss_coef * aux` to the loss it returns (TRL's `SFTTrainer` too, through
        `router_aux_loss_coef`). Kept so that old code runs: `aux_coef=` sets the model's coefficient.
        """

        def __init__(self, *args, aux_coef: float | None = None, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            inner = unwrap(self.model)
            if aux_coef is not None:
                model_hooks.set_aux_coef(inner, aux_coef)
            self.aux_coef = model_hooks.aux_coef(inner)

    AdaMoLETrainer.__module__, AdaMoLETrainer.__qualname__ = __name__, "AdaMoLETrainer"
    return AdaMoLETrainer


def __getattr__(name: str):
    if name == "AdaMoLETrainer":  # transformers.Trainer (and accelerate) load on first use
        cls = _trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
