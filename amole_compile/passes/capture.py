"""Capture a model as an FX graph with `torch.export.export(strict=False)`, before decompositions.

HF models get example inputs synthesised from their config (no tokenizer, no downloads); other modules take
`example_inputs=` (a tuple of positional args, or a dict of keyword args). The model's training flags are
restored afterwards, whatever happens.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any

import torch
from torch import nn

_SEQ = 8
_BATCH = 2


class CaptureError(RuntimeError):
    """The model could not be captured (or needs example inputs we cannot synthesise)."""


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def synthesize_inputs(model: nn.Module) -> dict[str, Any]:
    """Token-id inputs for a HF text model, from its config: input_ids [2, 8] (and decoder_input_ids)."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) if config is not None else None
    main = getattr(model, "main_input_name", "input_ids")
    if config is None or not isinstance(vocab, int) or main != "input_ids":
        raise CaptureError(
            f"cannot synthesise example inputs for {type(model).__name__}: it is not a Hugging Face text model "
            "with a config.vocab_size; pass example_inputs=(tensor, ...) or example_inputs={'name': tensor}")
    device = _device_of(model)
    seq = min(_SEQ, getattr(config, "max_position_embeddings", _SEQ) or _SEQ)
    ids = (torch.arange(_BATCH * seq) % max(vocab - 1, 1) + 1).reshape(_BATCH, seq).to(device)
    kwargs: dict[str, Any] = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids
    if _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    return kwargs


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every submodule in eval mode and restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def capture(model: nn.Module, example_inputs: tuple | dict | None = None) -> torch.export.ExportedProgram:
    """model -> ExportedProgram (non-strict, not decomposed)."""
    if example_inputs is None:
        args, kwargs = (), synthesize_inputs(model)
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    elif isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    else:
        raise TypeError(f"example_inputs must be a tuple, a dict or a tensor, got {type(example_inputs).__name__}")
    with eval_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(model, args, kwargs, strict=False)
        except Exception as exc:
            raise CaptureError(
                f"could not capture {type(model).__name__} with torch.export(strict=False): "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
