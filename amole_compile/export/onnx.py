"""`export_onnx`: a (transformed or plain) HF causal LM or encoder -> an ONNX file onnxruntime runs, or with
`genai=True` a folder onnxruntime-genai serves (`genai.py`).

    check      the destination (before any work), the options (`GraphOptions`), the model (`check_model`), the
               adapter names to stack
    graph      the wrapper to export: `_graphs.scoring_spec` or `_graphs.decoder_spec` (kv_cache), with an
               `adapter_ids` input when several adapters share the graph
    pipeline   `_pipeline.export_graph`: capture, translate, edit (the adapter names as metadata), write

The steps, the translation of the AdaMoLE op and the choice of opset are described in `_pipeline.py`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from . import genai as _genai
from ._graphs import decoder_spec, scoring_spec, with_adapter_ids
from ._pipeline import DEFAULT_OPSET, GraphOptions, OnnxExportError, check_model, export_graph, is_ours

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["ADAPTERS_KEY", "DEFAULT_OPSET", "OnnxExportError", "check_output", "export_onnx"]

ADAPTERS_KEY = "amole_adapters"  # metadata: the JSON list of adapter names `adapter_ids` index


def export_onnx(model: nn.Module, path: str | os.PathLike, *, kv_cache: bool = False, opset: int | None = None,
                dynamic: bool = True, masking: str = "dense", external_data: bool | None = None,
                adapters: Sequence[str] | None = None, genai: bool = False,
                tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None = None, overwrite: bool = False) -> Path:
    """Export `model` to the ONNX file `path` and return its Path.

    kv_cache       False: scoring graph (input_ids, attention_mask[, position_ids]) -> logits.
                   True: decoding graph that also takes `past_key_values.<i>.key|value` and returns
                   `present.<i>.key|value` (a past of length 0 does the prefill).
    opset          ONNX opset (>= 18); None means 20 (`_pipeline.py` says why not 23).
    dynamic        batch and sequence lengths dynamic (True) or fixed to the example (batch 1, 8 tokens;
                   decoding: 1 new token after 8).
    masking        "dense" (every expert computed, unselected ones weighted 0) or "skip" (each expert in an
                   ONNX If that skips experts no token of the batch selected).
    external_data  weights in a separate `<name>.data` file; None: only above 1 GiB.
    adapters       names of the model's adapters to stack in the graph, which then takes a last input
                   `adapter_ids` [batch] int64: row i runs adapters[adapter_ids[i]], -1 the base model
                   (`OnnxLM(..., adapter_ids=...)`). Adapters of any sizes and methods share the graph (padded);
                   the names are in the file's metadata (`amole_adapters`). None: the active adapter.
                   With genai=True: the adapters written as `<name>.onnx_adapter` files instead (see genai).
    genai          `path` is a folder for onnxruntime-genai: the KV-cache decoder, genai_config.json, the
                   tokenizer files (`tokenizer=` a directory or tokenizer object) and, with `adapters=[names]`,
                   one `<name>.onnx_adapter` each, the adapter tensors being graph inputs (`export/genai.py`).
    overwrite      replace an existing file `path` that this package did not write, or that is read-only (else
                   refused before any work); an earlier export of ours is replaced without it. A genai folder
                   replaces only an empty folder or an earlier genai export.

    The model runs in eval mode for the export and gets its modes back afterwards. The file is written in a
    temporary folder in the destination directory and renamed into place: a failure leaves nothing behind, and
    a reader (also after a kill mid-write) sees the old file, with its data file, or the new (docs/onnx.md).
    """
    if tokenizer is not None and not genai:
        raise ValueError("tokenizer= needs genai=True")
    dest = None if genai else _destination(path, overwrite)  # genai: a folder, checked by export_genai
    options = GraphOptions(DEFAULT_OPSET if opset is None else opset, masking, external_data)
    check_model(model)
    if genai:
        return _genai.export_genai(model, path, options, adapters=adapters, tokenizer=tokenizer)
    names = _adapters(model, adapters)

    def make_spec():
        spec = decoder_spec(model, dynamic) if kv_cache else scoring_spec(model, dynamic)
        return with_adapter_ids(spec, names)

    def name_adapters(onnx_model) -> None:
        onnx_model.metadata_props[ADAPTERS_KEY] = json.dumps(list(names))

    export_graph(model, make_spec, dest, options, name_adapters if names is not None else None)
    return dest


def _adapters(model: nn.Module, adapters: Sequence[str] | None) -> tuple[str, ...] | None:
    """The checked adapter names to stack (None: export the active adapter only)."""
    if adapters is None:
        return None
    from ..model.state import adapter_names, check_name

    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
        raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters lists a name twice: {list(adapters)}")
    if not adapter_names(model):
        raise ValueError(f"{type(model).__name__} holds no adapters; transform it first")
    return tuple(check_name(model, a) for a in adapters)


def check_output(path: str | os.PathLike, genai: bool = False, overwrite: bool = False) -> Path:
    """Check, before any work, that `export_onnx(..., path, genai=genai)` can write there -> the destination."""
    return _genai.check_out_dir(path) if genai else _destination(path, overwrite)


# ---- destination ----------------------------------------------------------------------------------

def _destination(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check that the file can be created: its directory exists and is writable, the path is no directory, and
    an existing file there (or its `.data` file) is an earlier export of ours and writable, unless `overwrite`."""
    dest = Path(path).expanduser()
    parent = dest.parent if str(dest.parent) else Path(".")
    if dest.is_dir():
        raise IsADirectoryError(f"ONNX output path {dest} is a directory; give a file name such as model.onnx")
    if not parent.exists():
        raise FileNotFoundError(f"ONNX output directory {parent} does not exist")
    if not parent.is_dir():
        raise NotADirectoryError(f"ONNX output directory {parent} is not a directory")
    try:  # a real probe: permission bits say nothing for root, nor for read-only file systems
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".amole_probe_"):
            pass
    except OSError as exc:
        raise PermissionError(f"ONNX output directory {parent} is not writable ({exc.strerror})") from exc
    if not overwrite:
        _refuse_replacing(dest)
    return dest.absolute()


def _refuse_replacing(dest: Path) -> None:
    """FileExistsError when `dest` exists and is not an export of ours or is read-only, or when only its data
    file `<dest>.data` exists (someone else's file of that name)."""
    data = dest.with_name(f"{dest.name}.data")
    hint = "export elsewhere, or pass overwrite=True to replace it"
    if dest.exists():
        if not is_ours(dest):
            raise FileExistsError(f"ONNX output {dest} exists and was not written by amole_compile: not replaced "
                                  f"({hint})")
        if not os.stat(dest).st_mode & 0o222:
            raise FileExistsError(f"ONNX output {dest} is read-only: not replaced ({hint})")
    elif data.exists():
        raise FileExistsError(f"{data} exists without {dest.name}: not an export of ours, not replaced ({hint})")
