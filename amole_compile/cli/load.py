"""Models and adapters from folders, for the commands: a `save_pretrained` folder as the right HF class, with
the adapters of an adapter folder on it, and exported from there."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn


def load_pretrained(model_dir: str | os.PathLike) -> nn.Module:
    """AutoModelForCausalLM for generating architectures, else the saved head class (or AutoModel), in eval
    mode."""
    import transformers

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    config = transformers.AutoConfig.from_pretrained(model_dir)
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        cls = transformers.AutoModelForCausalLM
    else:
        cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), transformers.AutoModel)
    return cls.from_pretrained(model_dir).eval()


def load_with_adapters(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None) -> nn.Module:
    """`load_pretrained(model_dir)` with `load_adapters(adapter_dir)` (ours or an upstream-repo checkpoint;
    None: the base model)."""
    from ..checkpoint.io import load_adapters

    model = load_pretrained(model_dir)
    if adapter_dir is not None:
        load_adapters(model, adapter_dir)
    return model


def export_from_dirs(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None,
                     out_path: str | os.PathLike, *, kv_cache: bool = False, opset: int | None = None,
                     masking: str = "dense", genai: bool = False, adapters: Sequence[str] | None = None) -> Path:
    """Load an HF `save_pretrained` directory with the adapters of `adapter_dir` (None exports the base model)
    and export it to `out_path` (with `genai`: a folder, tokenizer files copied from `model_dir`). `adapters`:
    the loaded adapters to stack (or, with genai, to write as `.onnx_adapter` files). Returns the written
    path."""
    from ..export.onnx import check_output, export_onnx

    check_output(out_path, genai=genai)  # fail before the (slow) load
    model = load_with_adapters(model_dir, adapter_dir)
    if genai:
        return export_onnx(model, out_path, genai=True, tokenizer=model_dir, opset=opset, masking=masking,
                           adapters=adapters)
    return export_onnx(model, out_path, kv_cache=kv_cache, opset=opset, masking=masking, adapters=adapters)
