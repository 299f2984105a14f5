"""`export_onnx`: a (transformed or plain) HF causal LM or encoder -> an ONNX file onnxruntime runs.

    capture    torch.export.export(wrapper, strict=False)         wrapper: `_kv.ScoringGraph` / `_kv.DecoderGraph`
    translate  torch.onnx.export(ep, dynamo=True, custom_translation_table={amole::adapter: onnxscript})
    check      onnx.checker on the file
    write      temp directory inside the destination directory, then os.replace (data file first)

The AdaMoLE op becomes an ONNX subgraph that routes every token at run time (`_translation.py`). The default
opset is 20: opset 23 makes the exporter emit native Attention / RotaryEmbedding nodes, which onnxruntime fails
on for batch > 1 unless position_ids are fed batched.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ._graphs import GraphSpec, decoder_spec, scoring_spec, with_adapter_ids
from ._translation import MASKING, translation_table

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_OPSET = 20
MIN_OPSET = 18
ADAPTERS_KEY = "amole_adapters"  # metadata: the JSON list of adapter names `adapter_ids` index
EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to `<file>.data` (protobuf stops at 2 GiB)


class OnnxExportError(RuntimeError):
    """The model could not be exported; the message names the failing module and op where known."""


def export_onnx(model: nn.Module, path: str | os.PathLike, *, kv_cache: bool = False, opset: int | None = None,
                dynamic: bool = True, masking: str = "dense", external_data: bool | None = None,
                adapters: Sequence[str] | None = None, genai: bool = False,
                tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None = None) -> Path:
    """Export `model` to the ONNX file `path` and return its Path.

    kv_cache       False: scoring graph (input_ids, attention_mask[, position_ids]) -> logits.
                   True: decoding graph that also takes `past_key_values.<i>.key|value` and returns
                   `present.<i>.key|value` (a past of length 0 does the prefill).
    opset          ONNX opset (>= 18); None means 20 (see the module doc for why not 23).
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

    The model runs in eval mode for the export and gets its modes back afterwards. The file is written to a
    temporary name in the destination directory and renamed into place, so a failure leaves nothing behind.
    """
    if tokenizer is not None and not genai:
        raise ValueError("tokenizer= needs genai=True")
    dest = None if genai else _destination(path)  # genai: a folder, checked by export_genai
    opset = _opset(opset)
    if masking not in MASKING:
        raise ValueError(f"masking must be one of {MASKING}, got {masking!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx takes an nn.Module (an HF model), got {type(model).__name__}")
    from ..integrations.quantized import library

    lib = library(model)
    if lib is not None:
        raise OnnxExportError(
            f"{type(model).__name__} has a base quantized by {lib}, whose kernels have no ONNX form: export the "
            "unquantized base with the same adapters (from_pretrained(dir) without quantization_config, then "
            "load_adapters(model, adapter_dir))")
    if genai:
        from .genai import export_genai

        graph = functools.partial(_export_graph, model, opset=opset, masking=masking, external_data=external_data)
        return export_genai(model, path, graph, adapters=adapters, tokenizer=tokenizer)
    names = _adapters(model, adapters)
    with _eval_mode(model):
        spec = decoder_spec(model, dynamic) if kv_cache else scoring_spec(model, dynamic)
        program = _convert(model, with_adapter_ids(spec, names), opset, masking)
    if names is not None:
        program.model.metadata_props[ADAPTERS_KEY] = json.dumps(list(names))
    _write(program, dest, external_data)
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


def check_output(path: str | os.PathLike, genai: bool = False) -> Path:
    """Check, before any work, that `export_onnx(..., path, genai=genai)` can write there -> the destination."""
    if genai:
        from .genai import check_out_dir

        return check_out_dir(path)
    return _destination(path)


# ---- steps ----------------------------------------------------------------------------------------

def _destination(path: str | os.PathLike) -> Path:
    """Check that the file can be created: its directory exists and is writable, the path is no directory."""
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
    return dest.absolute()


def _opset(opset: int | None) -> int:
    if opset is None:
        return DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an integer >= {MIN_OPSET} (the dynamo exporter's minimum), got {opset!r}")
    return opset


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode (no dropout, no aux-loss bookkeeping) for the export; every module's mode restored after."""
    from ..model.modules import ExpertSet

    modes = {m: m.training for m in model.modules()}
    for m in model.modules():
        if isinstance(m, ExpertSet):
            m.clear_aux()  # the eval forward would clear it; clearing it here keeps the capture side-effect free
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _convert(model: nn.Module, spec: GraphSpec, opset: int, masking: str):
    """torch.export (non-strict) the wrapper, then translate to ONNX; failures name the module / op."""
    try:
        ep = _capture(spec)
    except Exception as exc:
        where = _failing_module(exc, model)
        raise OnnxExportError(f"torch.export failed{where}: {_first_line(exc)}") from exc
    try:
        return torch.onnx.export(ep, (), input_names=spec.input_names, output_names=spec.output_names,
                                 opset_version=opset, dynamo=True, dynamic_shapes=spec.dynamic_shapes,
                                 custom_translation_table=translation_table(masking), verbose=False,
                                 optimize=True)
    except Exception as exc:
        raise OnnxExportError(f"ONNX translation failed{_failing_node(exc, ep)}: {_first_line(exc)}") from exc


def _export_graph(model: nn.Module, make_spec, dest: Path, edit=None, *, opset: int, masking: str,
                  external_data: bool | None) -> GraphSpec:
    """Capture `make_spec()` in eval mode and translate it, let `edit` change the ONNX graph, write `dest`."""
    with _eval_mode(model):
        spec = make_spec()
        program = _convert(model, spec, opset, masking)
    if edit is not None:
        edit(program.model.graph)
    _write(program, dest, external_data)
    return spec


def _capture(spec: GraphSpec):
    """torch.export, non-strict, with the options torch.onnx's own non-strict capture uses (sizes 0 and 1 stay
    symbolic, so a decoder exported with a past of 5 also runs with a past of 0)."""
    from torch.fx.experimental import _config as fx_config

    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
        return torch.export.export(spec.module, spec.args, dynamic_shapes=_as_dims(spec.dynamic_shapes),
                                   strict=False, prefer_deferred_runtime_asserts_over_guards=True)


def _as_dims(shapes):
    """Axis names -> Dim.DYNAMIC for torch.export (the names go to torch.onnx.export, which renames axes)."""
    if shapes is None:
        return None
    if isinstance(shapes, dict):
        return {axis: torch.export.Dim.DYNAMIC for axis in shapes}
    return type(shapes)(_as_dims(s) for s in shapes)


def _write(program, dest: Path, external_data: bool | None) -> None:
    """Save into a temp directory next to `dest`, check it, then rename the files into place."""
    import onnx
    import onnx_ir as ir

    size = sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
               if v.const_value is not None)
    external = size > EXTERNAL_DATA_BYTES if external_data is None else bool(external_data)
    data_name = f"{dest.name}.data"
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        ir.save(program.model, tmp / dest.name, external_data=data_name if external else None)
        onnx.checker.check_model(str(tmp / dest.name), full_check=False)
        if external:
            os.replace(tmp / data_name, dest.parent / data_name)
        os.replace(tmp / dest.name, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- error messages -------------------------------------------------------------------------------

def _first_line(exc: BaseException) -> str:
    """The root cause's first line (the exporter wraps errors in long reports)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _failing_module(exc: BaseException, model: nn.Module) -> str:
    """' in <module fqn> (<Class>)' for the innermost module whose forward is on the failing stack."""
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    e: BaseException | None = exc
    while e is not None:
        for frame, _ in traceback.walk_tb(e.__traceback__):
            obj = frame.f_locals.get("self")
            if isinstance(obj, nn.Module) and id(obj) in names:
                found = obj
        e = e.__cause__ or e.__context__
    if found is None:
        return ""
    return f" in module {names[id(found)] or '<root>'} ({type(found).__name__})"


def _failing_node(exc: BaseException, ep) -> str:
    """' at op <target> in module <fqn>' for the FX node the exporter reported, when it can be found."""
    text = "".join(str(e) for e in _chain(exc))
    for node in ep.graph.nodes:
        if node.op == "call_function" and f"%{node.name} :" in text:
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            if not stack:
                return f" at op {node.target}"
            fqn, cls = stack[-1]
            fqn = fqn.split(".", 1)[1] if "." in fqn else "<root>"  # drop the wrapper's `model.`
            return f" at op {node.target} in module {fqn} ({getattr(cls, '__name__', str(cls).rsplit('.', 1)[-1])})"
    return ""


def _chain(exc: BaseException):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__
