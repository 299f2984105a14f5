"""The export pipeline: one graph of a model -> one ONNX file. `export_onnx` (scoring or KV-cache graph) and the
genai folder (`genai.py`) both run it.

    check      the model is an nn.Module whose base is not quantized                       `check_model`
    capture    torch.export.export(spec.module, strict=False), in eval mode                 spec: `_graphs.GraphSpec`
    translate  torch.onnx.export(ep, dynamo=True, custom_translation_table={amole::adapter: onnxscript})
    edit       optional: a function that changes the ONNX model (metadata, initializers)
    write      in a temporary folder beside the destination, checked with onnx.checker, then renamed into
               place: `.onnx` alone with `files.atomic_files`; `.onnx` + `.onnx.data` with `files.commit_pair`
               (the new data under a fresh name first, then the `.onnx` naming it, then both under their own
               names), so a reader who opens the `.onnx` gets the old pair or the new one, never a mix

The AdaMoLE op becomes an ONNX subgraph that routes every token at run time (`_translation.py`). The default
opset is 20: opset 23 makes the exporter emit native Attention / RotaryEmbedding nodes, which onnxruntime fails
on for batch > 1 unless position_ids are fed batched. Failures raise `OnnxExportError` naming the module and op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..files import atomic_files, commit_pair, folder_lock, remove_versions
from ._graphs import GraphSpec
from ._translation import MASKING, translation_table

DEFAULT_OPSET = 20
MIN_OPSET = 18
EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to `<file>.data` (protobuf stops at 2 GiB)
MARK = "amole_compile"  # metadata every file we write carries: such a file is ours to replace


class OnnxExportError(RuntimeError):
    """The model could not be exported; the message names the failing module and op where known."""


@dataclasses.dataclass(frozen=True)
class GraphOptions:
    """How a graph is translated and written (`export_onnx`'s opset, masking and external_data), checked."""

    opset: int = DEFAULT_OPSET
    masking: str = "dense"
    external_data: bool | None = None

    def __post_init__(self) -> None:
        opset = self.opset
        if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
            raise ValueError(f"opset must be an integer >= {MIN_OPSET} (the dynamo exporter's minimum), got {opset!r}")
        if self.masking not in MASKING:
            raise ValueError(f"masking must be one of {MASKING}, got {self.masking!r}")


def check_model(model: nn.Module) -> None:
    """Refuse what cannot be exported before any work: a non-module, a base quantized by bitsandbytes / torchao."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx takes an nn.Module (an HF model), got {type(model).__name__}")
    from ..integrations.quantized import library

    lib = library(model)
    if lib is not None:
        raise OnnxExportError(
            f"{type(model).__name__} has a base quantized by {lib}, whose kernels have no ONNX form: export the "
            "unquantized base with the same adapters (from_pretrained(dir) without quantization_config, then "
            "load_adapters(model, adapter_dir))")


def export_graph(model: nn.Module, make_spec: Callable[[], GraphSpec], dest: Path, options: GraphOptions,
                 edit: Callable | None = None) -> GraphSpec:
    """Run the pipeline: capture `make_spec()` in eval mode and translate it, let `edit(onnx_ir.Model)` change
    the result, write the file `dest` (plus `dest.data` for external weights). Returns the exported spec."""
    with eval_mode(model):
        spec = make_spec()
        program = translate(model, spec, options)
    if edit is not None:
        edit(program.model)
    write(program.model, dest, options.external_data)
    return spec


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode (no dropout, no aux-loss bookkeeping) for the export; every module's mode restored after."""
    from ..model.modules import expert_sets

    modes = {m: m.training for m in model.modules()}
    for m in expert_sets(model):
        m.clear_aux()  # the eval forward would clear it; clearing it here keeps the capture side-effect free
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def translate(model: nn.Module, spec: GraphSpec, options: GraphOptions):
    """Capture (torch.export, non-strict) the wrapper, then translate it to ONNX -> torch.onnx's ONNXProgram.
    Failures raise `OnnxExportError` naming the module / op."""
    try:
        ep = capture(spec)
    except Exception as exc:
        raise OnnxExportError(f"torch.export failed{_failing_module(exc, model)}: {_first_line(exc)}") from exc
    try:
        return torch.onnx.export(ep, (), input_names=spec.input_names, output_names=spec.output_names,
                                 opset_version=options.opset, dynamo=True, dynamic_shapes=spec.dynamic_shapes,
                                 custom_translation_table=translation_table(options.masking), verbose=False,
                                 optimize=True)
    except Exception as exc:
        raise OnnxExportError(f"ONNX translation failed{_failing_node(exc, ep)}: {_first_line(exc)}") from exc


def capture(spec: GraphSpec) -> torch.export.ExportedProgram:
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


def write(model, dest: Path, external_data: bool | None) -> Path:
    """Save the onnx_ir model as `dest` (weights in `<dest>.data` when `external_data`, None: above 1 GiB),
    checked with onnx.checker before it is renamed into place; a reader sees the old file(s) or the new."""
    import onnx
    import onnx_ir as ir

    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    external = size > EXTERNAL_DATA_BYTES if external_data is None else bool(external_data)
    data = dest.with_name(f"{dest.name}.data")
    model.metadata_props[MARK] = "1"

    def save(path: Path, data_name: str | None = None) -> None:
        ir.save(model, path, external_data=data_name)
        onnx.checker.check_model(str(path), full_check=False)

    if external:
        return commit_pair(dest, data, save, _relocate)
    with folder_lock(dest.parent):
        with atomic_files(dest) as (staged,):
            save(staged)
        data.unlink(missing_ok=True)  # an earlier export's external data, named by nothing now
        remove_versions(data)
    return dest


def _relocate(onnx_file: Path, out: Path, data_name: str) -> None:
    """Write `out`: the ONNX file `onnx_file`, its external tensors read from `data_name` instead."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    proto = onnx.load(str(onnx_file), load_external_data=False)
    for tensor in _get_all_tensors(proto):
        if uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data_name
    onnx.save(proto, str(out))


def is_ours(path: Path) -> bool:
    """Was the ONNX file `path` written by this package (our metadata, or the adapter names of an export made
    before it was added)?"""
    import onnx

    try:
        keys = {p.key for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # not an ONNX file
        return False
    return MARK in keys or "amole_adapters" in keys


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
    for e in _chain(exc):
        for frame, _ in traceback.walk_tb(e.__traceback__):
            obj = frame.f_locals.get("self")
            if isinstance(obj, nn.Module) and id(obj) in names:
                found = obj
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


def _chain(exc: BaseException | None):
    """The exception, its cause (or context), theirs, ..."""
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__
