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


def _sub(config, name: str, key: str):
    """config.<key>, or config.<name>.<key> for a two-tower / multi-modal config."""
    sub = getattr(config, name, None)
    val = getattr(sub, key, None) if sub is not None else None
    return val if val is not None else getattr(config, key, None)


def synthesize_inputs(model: nn.Module) -> dict[str, Any]:
    """Example inputs for a HF model from its config, by what its forward takes: `input_ids` [2, 8] (text),
    `pixel_values` [2, C, H, W] (vision, and the image tower of a two-tower model such as CLIP),
    `input_features` [2, mels, frames] (Whisper), `decoder_input_ids` (encoder-decoders), `use_cache=False`."""
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", "input_ids")
    device = _device_of(model)
    kwargs: dict[str, Any] = {}
    vocab = _sub(config, "text_config", "vocab_size") if config is not None else None
    if isinstance(vocab, int):
        seq = min(_SEQ, _sub(config, "text_config", "max_position_embeddings") or _SEQ)
        ids = (torch.arange(_BATCH * seq) % max(vocab - 1, 1) + 1).reshape(_BATCH, seq).to(device)
        if main == "input_ids" or _accepts(model, "input_ids") and hasattr(config, "text_config"):
            kwargs["input_ids"] = ids
        if getattr(config, "is_encoder_decoder", False) and _accepts(model, "decoder_input_ids"):
            kwargs["decoder_input_ids"] = ids
    image = _sub(config, "vision_config", "image_size") if config is not None else None
    two_tower = hasattr(config, "vision_config") and hasattr(config, "text_config") and not any(
        hasattr(config, k) for k in ("image_token_id", "image_token_index"))
    if isinstance(image, int) and _accepts(model, "pixel_values") and (main == "pixel_values" or two_tower):
        size = image
        chans = _sub(config, "vision_config", "num_channels") or 3
        g = torch.Generator().manual_seed(0)
        kwargs["pixel_values"] = torch.randn(_BATCH, chans, size, size, generator=g).to(device)
    mels = getattr(config, "num_mel_bins", None) if config is not None else None
    if main == "input_features" and isinstance(mels, int):
        frames = 2 * (getattr(config, "max_source_positions", 1500) or 1500)
        g = torch.Generator().manual_seed(0)
        kwargs["input_features"] = torch.randn(_BATCH, mels, frames, generator=g).to(device)
    if main not in kwargs:
        raise CaptureError(
            f"cannot synthesise example inputs for {type(model).__name__}: it is not a Hugging Face text, vision "
            "or speech model with the config fields to build its inputs; pass example_inputs=(tensor, ...) or "
            "example_inputs={'name': tensor}")
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
