"""Retired helpers kept so that old code runs (`amole_compile.compute_loss` and `.AdaMoLETrainer` warn with a
DeprecationWarning when they are looked up). Neither is needed: a transformed model adds
`AdaMoLEConfig.aux_loss_coef * aux` to the loss it returns (`loss.py`), so a plain HF `Trainer` or TRL
`SFTTrainer` trains AdaMoLE with its aux loss.
"""

from __future__ import annotations

from torch import Tensor, nn

from .distributed import unwrap
from .loss import aux_coef as model_aux_coef
from .loss import set_aux_coef


def compute_loss(model: nn.Module, inputs: dict, aux_coef: float | None = None,
                 return_outputs: bool = False) -> Tensor | tuple[Tensor, object]:
    """Retired. The training loss of a transformed model: `model(**inputs).loss` (and the outputs when
    `return_outputs`); the model's loss already holds `AdaMoLEConfig.aux_loss_coef * aux`. `aux_coef` is kept
    for old callers: None or the model's own coefficient; another value raises."""
    inner = unwrap(model)
    coef = model_aux_coef(inner)
    if aux_coef is not None and abs(float(aux_coef) - coef) > 1e-12:
        raise ValueError(f"compute_loss(aux_coef={aux_coef}): the model adds aux_loss_coef={coef} to its "
                         "own loss; set the coefficient with AdaMoLEConfig(aux_loss_coef=...) when transforming")
    outputs = model(**inputs)
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs[0]
    if loss is None:
        raise ValueError("the model returned no loss: pass `labels` in inputs")
    return (loss, outputs) if return_outputs else loss


def _trainer_class():
    from transformers import Trainer

    class AdaMoLETrainer(Trainer):
        """Retired: a plain `transformers.Trainer` now trains AdaMoLE with its aux loss, because a transformed
        model adds `AdaMoLEConfig.aux_loss_coef * aux` to the loss it returns (TRL's `SFTTrainer` too). Kept so
        that old code runs: `aux_coef=` sets the model's coefficient.
        """

        def __init__(self, *args, aux_coef: float | None = None, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            inner = unwrap(self.model)
            if aux_coef is not None:
                set_aux_coef(inner, aux_coef)
            self.aux_coef = model_aux_coef(inner)

    AdaMoLETrainer.__module__, AdaMoLETrainer.__qualname__ = __name__, "AdaMoLETrainer"
    return AdaMoLETrainer


def __getattr__(name: str):
    if name == "AdaMoLETrainer":  # transformers.Trainer (and accelerate) load on first use
        cls = _trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
