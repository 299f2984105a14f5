"""`export_onnx(model, out_dir, genai=True)`: a folder onnxruntime-genai serves (`og.Model(out_dir)`).

    model.onnx             the KV-cache decoder (`kv_cache=True`); with `adapters=[...]` every adapter tensor is a
                           graph input `amole.<module>.<role>.<param>` whose default (an initializer of the same
                           name) is zeros, so a generator with no active adapter runs the base model
    genai_config.json      model.type, context_length, vocab_size, bos/eos/pad ids, head counts and sizes, the
                           graph's input/output names, `search` defaults (`past_present_share_buffer: false`: the
                           graph's Concat cannot write into a preallocated present buffer)
    <name>.onnx_adapter    one per adapter, onnxruntime's adapter format (`og.Adapters(model).load(file, name)`,
                           `generator.set_active_adapter(adapters, name)`); the graph's per-site settings are
                           the first adapter's, which every other must share but for its scale (`_settings.py`)
    tokenizer files        copied from the tokenizer directory (or saved from a tokenizer object) when given

The steps: check the folder (`check_out_dir`) and snapshot the adapters to serve; then, in a temporary folder
beside `out_dir` (`folders.atomic_folder`): the decoder graph through the export pipeline (`_pipeline.export_graph`,
the first adapter active, its tensors as inputs, zero defaults as the edit), genai_config.json from the exported
graph's names and shapes, the adapter files, the tokenizer files; the finished folder is then swapped for
`out_dir` in one step (`folders.move_folder`), so a reader sees the old folder or the new one and a failed export
leaves no partial folder. onnxruntime-genai itself is not needed to export (only
onnxruntime's `AdapterFormat`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..files import atomic_write, mount_point, staging_of
from ..folders import atomic_folder
from ._graphs import GraphSpec, decoder_spec
from ._pipeline import GraphOptions, export_graph
from ._settings import INPUT_PREFIX, fit, input_name, read_settings, site_settings, write_settings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MODEL_FILE = "model.onnx"
CONFIG_FILE = "genai_config.json"
ADAPTER_SUFFIX = ".onnx_adapter"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")
GENAI_TYPES = ("llama", "mistral", "qwen2")  # HF model_type values genai 0.18 names; others run as "decoder"
DEFAULT_CONTEXT = 2048


class MissingTokenizerWarning(UserWarning):
    """The genai export found no tokenizer files: `og.Model` loads, `og.Tokenizer` does not."""


def export_genai(model: nn.Module, out_dir: str | os.PathLike, options: GraphOptions | None = None, *,
                 adapters: Sequence[str] | None = None,
                 tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None = None) -> Path:
    """Write the onnxruntime-genai folder `out_dir` for `model` (see the module doc) and return its Path.

    options       opset, masking and external_data of the decoder graph (`export_onnx`'s; None: defaults)
    adapters      names of adapters to serve: the graph takes the adapter tensors as inputs and each name gets
                  `<name>.onnx_adapter`. None bakes the model's (active) adapter into the graph.
    tokenizer     a directory holding tokenizer files, or a tokenizer object (`save_pretrained`); None looks in
                  the directory the model was loaded from. Without tokenizer files the export warns in one line.
    """
    dest = check_out_dir(out_dir)
    options = GraphOptions() if options is None else options
    weights = adapter_weights(model, adapters) if adapters is not None else {}
    settings = site_settings(model, next(iter(weights))) if weights else {}

    def edit(onnx_model) -> None:  # the adapter inputs' zero defaults, and the settings the graph bakes in
        _zero_defaults(onnx_model)
        write_settings(onnx_model, settings)

    def make_spec() -> GraphSpec:
        spec = decoder_spec(model, dynamic=True)
        return with_adapter_inputs(spec, next(iter(weights.values()))) if weights else spec

    with atomic_folder(dest) as tmp:
        with _active(model, next(iter(weights))) if weights else contextlib.nullcontext():
            spec = export_graph(model, make_spec, tmp / MODEL_FILE, options, edit if weights else None)
        (tmp / CONFIG_FILE).write_text(json.dumps(genai_config(model, spec), indent=2) + "\n")
        for name, tensors in weights.items():
            write_adapter(tensors, tmp / f"{name}{ADAPTER_SUFFIX}")
        _copy_tokenizer(tokenizer if tokenizer is not None else _model_dir(model), tmp, dest)
    return dest


def add_adapter(model: nn.Module, out_dir: str | os.PathLike, name: str) -> Path:
    """Write the model's adapter `name` (the active one if the model has no adapter of that name) as
    `<out_dir>/<name>.onnx_adapter` for a folder exported earlier with `adapters=[...]`, without exporting the
    graph again: e.g. an adapter trained later on the same sites.

    The adapter's tensors must match the graph's adapter inputs (names, shapes, element types), and its settings
    the graph's (`_settings.py`: the same method, E, top-k and cap per site; a scale of its own is folded into B)."""
    folder = Path(out_dir)
    _check_names([name])
    import onnx

    proto = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    want = graph_adapter_inputs(proto)
    if not want:
        raise ValueError(f"{folder / MODEL_FILE} takes no adapter inputs: export it with adapters=[...]")
    graph = read_settings(proto)
    if graph is None:
        raise ValueError(f"{folder / MODEL_FILE} does not say which adapter settings it bakes in (exported by an "
                         "earlier version): export the folder again with every adapter in adapters=[...]")
    from ..model.state import active_adapter, adapter_names

    own = name if name in adapter_names(model) else active_adapter(model)
    tensors = _snapshot(model, own)
    have = {input_name(k): (tuple(v.shape), _onnx_type(v.dtype)) for k, v in tensors.items()}
    if have != want:
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        raise ValueError(f"adapter {name!r} does not fit {folder / MODEL_FILE}: {diff[0]} is {have.get(diff[0])} "
                         f"here and {want.get(diff[0])} in the graph ({len(diff)} difference(s))")
    tensors = fit(tensors, site_settings(model, own), graph, name, str(folder / MODEL_FILE))
    return atomic_write(folder / f"{name}{ADAPTER_SUFFIX}", lambda tmp: write_adapter(tensors, Path(tmp)))


# ---- adapters as graph inputs ---------------------------------------------------------------------

def graph_adapter_inputs(proto) -> dict[str, tuple[tuple[int, ...], int]]:
    """The adapter inputs of an exported graph (an `onnx.ModelProto`): name -> (shape, ONNX element type)."""
    return {i.name: (tuple(d.dim_value for d in i.type.tensor_type.shape.dim), i.type.tensor_type.elem_type)
            for i in proto.graph.input if i.name.startswith(INPUT_PREFIX)}


def _onnx_type(dtype: torch.dtype) -> int:
    import onnx

    return onnx.helper.np_dtype_to_tensor_dtype(torch.empty(0, dtype=dtype).numpy().dtype)


def _check_names(names: list) -> None:
    """Adapter names become file names: distinct, non-empty, no path separators."""
    if not names or len(set(names)) != len(names) or \
            not all(isinstance(n, str) and n and Path(n).name == n for n in names):
        raise ValueError(f"adapters must be distinct non-empty names usable as file names, got {names!r}")


def _adapter_inputs(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """Adapter `name`'s (default: the active adapter's) live parameters, keyed by their name in the model."""
    from ..model.state import active_adapter, adapter_state

    name = active_adapter(model) if name is None else name
    return {} if name is None else dict(adapter_state(model, [name]))


def adapter_weights(model: nn.Module, names: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """adapter name -> {parameter name in the model: a detached copy}, for each of `names`, as the graph traced
    from the first serves them. All adapters must have the same graph inputs (roles, shapes, dtypes) and the
    first's settings (`_settings.fit`: a scale of their own is folded into their B)."""
    from ..model.state import adapter_names

    names = [names] if isinstance(names, str) else list(names)
    _check_names(names)
    known = adapter_names(model)
    if not known:
        raise ValueError(f"{type(model).__name__} has no AdaMoLE adapters; transform it (or load_adapters) first")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {known}")
    found = {name: _snapshot(model, name) for name in names}
    _same_shapes(found)
    first, *rest = names
    graph = site_settings(model, first)
    for name in rest:
        found[name] = fit(found[name], site_settings(model, name), graph, name,
                          f"the graph traced from adapter {first!r}")
    return found


def _snapshot(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _adapter_inputs(model, name).items()}


@contextlib.contextmanager
def _active(model: nn.Module, name: str):
    """Adapter `name` active (the graph's adapter inputs replace its parameters), the earlier one after."""
    from ..model.state import activate, active_adapter, check_name

    before = active_adapter(model)
    activate(model, check_name(model, name))
    try:
        yield
    finally:
        activate(model, before)


def _same_shapes(found: dict[str, dict[str, torch.Tensor]]) -> None:
    """One graph serves every adapter: same graph inputs, shapes and dtypes, else a ValueError naming the first
    difference."""
    found = {n: {input_name(k): v for k, v in t.items()} for n, t in found.items()}
    (first, ref), *rest = found.items()
    for name, tensors in rest:
        for key in sorted(set(ref) | set(tensors)):
            a, b = ref.get(key), tensors.get(key)
            sa = None if a is None else (tuple(a.shape), a.dtype)
            sb = None if b is None else (tuple(b.shape), b.dtype)
            if sa != sb:
                raise ValueError(f"adapters {first!r} and {name!r} cannot share one graph: {key} is {sa} in "
                                 f"{first!r} and {sb} in {name!r} (export them separately)")


class AdapterInputGraph(nn.Module):
    """The decoder graph with a last argument, the adapter tensors, swapped in for the model's parameters with
    `torch.func.functional_call`, so the exported graph takes them as inputs instead of folding them."""

    def __init__(self, inner: nn.Module, params: list[str]) -> None:
        super().__init__()
        self.inner, self.params = inner, params

    def forward(self, input_ids, attention_mask, position_ids, past, adapters):
        """The decoder's inputs plus the adapter tensors (in `params` order) -> the decoder's outputs."""
        swap = {f"model.{p}": t for p, t in zip(self.params, adapters, strict=True)}
        return torch.func.functional_call(self.inner, swap, (input_ids, attention_mask, position_ids, past))


def with_adapter_inputs(spec: GraphSpec, tensors: dict[str, torch.Tensor]) -> GraphSpec:
    """`spec` with the adapter tensors as extra (static-shaped) graph inputs named by `input_name`."""
    params = list(tensors)
    for p in params:  # functional_call would silently ignore a name that is not a parameter of the model
        spec.module.model.get_parameter(p)
    example = tuple(tensors[p] for p in params)
    dims = None if spec.dynamic_shapes is None else (*spec.dynamic_shapes, tuple({} for _ in params))
    return GraphSpec(AdapterInputGraph(spec.module, params), (*spec.args, example), dims,
                     [*spec.input_names, *map(input_name, params)], spec.output_names)


def _zero_defaults(onnx_model) -> None:
    """Give every adapter input a zero initializer of its own name: onnxruntime feeds it when no adapter is
    active (genai feeds nothing then), and B = 0 makes every site add exactly 0, i.e. the base model."""
    import onnx_ir as ir

    graph = onnx_model.graph
    for value in graph.inputs:
        if value.name.startswith(INPUT_PREFIX):
            dtype = value.dtype.numpy()
            value.const_value = ir.tensor(np.zeros([int(d) for d in value.shape], dtype=dtype), name=value.name)
            graph.register_initializer(value)


def write_adapter(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    """Write `{parameter name: tensor}` as an onnxruntime `.onnx_adapter` keyed by the graph input names."""
    import onnxruntime as ort

    arrays = {input_name(k): np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in tensors.items()}
    # OrtValue.ortvalue_from_numpy does not copy, and set_parameters keeps only the C values: the arrays (and
    # their OrtValues) must stay alive until export_adapter has written them, or the file holds garbage.
    values = {k: ort.OrtValue.ortvalue_from_numpy(a) for k, a in arrays.items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(values)
    fmt.export_adapter(str(path))
    del values, arrays
    return path


# ---- genai_config.json ----------------------------------------------------------------------------

def genai_config(model: nn.Module, spec: GraphSpec) -> dict:
    """genai_config.json for the decoder graph `spec` of `model`: ids and sizes from the HF config (and its
    generation config), KV heads and head size from the graph's past inputs, names from the graph."""
    cfg = model.config
    layout = [tuple(t.shape[1::2]) for t in spec.args[3][::2]]  # past_key_values.<i>.key [B, H, P, Dh]
    context = int(_first(cfg, "max_position_embeddings", "n_positions", "max_sequence_length") or DEFAULT_CONTEXT)
    heads = _first(cfg, "num_attention_heads", "n_head")
    bos, eos, pad = _special_ids(model)
    model_type = str(getattr(cfg, "model_type", "") or "")
    session = {"log_id": "onnxruntime-genai", "provider_options": []}
    if any(n.startswith(INPUT_PREFIX) for n in spec.input_names):
        session["log_severity_level"] = 3  # else onnxruntime warns once per adapter input with a default
    decoder = {
        "session_options": session,
        "filename": MODEL_FILE,
        "head_size": int(layout[0][1]),
        "hidden_size": int(_first(cfg, "hidden_size", "n_embd", "d_model")),
        "num_attention_heads": int(heads if heads is not None else layout[0][0]),
        "num_hidden_layers": len(layout),
        "num_key_value_heads": int(layout[0][0]),
        "inputs": _names(spec.input_names, {"input_ids", "attention_mask", "position_ids"}, "past_key_values"),
        "outputs": _names(spec.output_names, {"logits"}, "present"),
    }
    ids = {k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad)) if v is not None}
    return {
        "model": {**ids, "context_length": context, "decoder": decoder,  # genai refuses null ids: unset ones left out
                  "type": model_type if model_type in GENAI_TYPES else "decoder", "vocab_size": int(cfg.vocab_size)},
        "search": _search(model, context),
    }


def _first(cfg, *names):
    return next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), None)


def _special_ids(model: nn.Module) -> tuple:
    """bos, eos (an int or a list), pad: the generation config first, then the model config; pad falls back to
    the first eos id, as HF generate does."""
    sources = [getattr(model, "generation_config", None), model.config]

    def pick(attr):
        return next((getattr(s, attr) for s in sources if s is not None and getattr(s, attr, None) is not None),
                    None)

    bos, eos, pad = pick("bos_token_id"), pick("eos_token_id"), pick("pad_token_id")
    if isinstance(eos, (list, tuple)):
        eos = [int(e) for e in eos] if len(eos) > 1 else (int(eos[0]) if eos else None)
    first_eos = eos[0] if isinstance(eos, list) else eos
    pad = pad if pad is not None else first_eos
    return (None if bos is None else int(bos)), eos, (None if pad is None else int(pad))


def _names(names: list[str], plain: set[str], kv_prefix: str) -> dict:
    """Graph names -> genai's inputs/outputs dict: the plain names as they are, the per-layer key/value names as
    `%d` templates (`past_key_values.%d.key` -> `past_key_names`)."""
    role = {"past_key_values": "past", "present": "present"}[kv_prefix]
    out = {n: n for n in names if n in plain}
    for kind in ("key", "value"):
        pattern = re.compile(rf"^{re.escape(kv_prefix)}\.(\d+)\.{kind}$")
        if any(pattern.match(n) for n in names):
            out[f"{role}_{kind}_names"] = f"{kv_prefix}.%d.{kind}"
    return out


def _search(model: nn.Module, context: int) -> dict:
    """Search defaults (greedy unless the generation config samples); `past_present_share_buffer` must be false."""
    gen = getattr(model, "generation_config", None)

    def get(attr, default):
        value = getattr(gen, attr, None) if gen is not None else None
        return default if value is None else value

    return {"diversity_penalty": 0.0, "do_sample": bool(get("do_sample", False)), "early_stopping": True,
            "length_penalty": float(get("length_penalty", 1.0)), "max_length": context, "min_length": 0,
            "no_repeat_ngram_size": int(get("no_repeat_ngram_size", 0)), "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": False,
            "repetition_penalty": float(get("repetition_penalty", 1.0)),
            "temperature": float(get("temperature", 1.0)), "top_k": int(get("top_k", 50)),
            "top_p": float(get("top_p", 1.0))}


# ---- files ----------------------------------------------------------------------------------------

def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """The output folder: its parent exists, and it is writable where the export is staged (beside the folder,
    inside a mount point); an existing folder must be empty (but for staging folders killed exports left) or an
    earlier genai export (it is replaced), never a file or an unrelated folder."""
    dest = Path(out_dir).expanduser().absolute()
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"genai output {dest} is a file; give a folder name")
    held = [e for e in dest.iterdir() if not staging_of(e.name, dest)] if dest.is_dir() else []
    if held and not (dest / CONFIG_FILE).is_file():
        raise FileExistsError(f"genai output folder {dest} exists and holds no {CONFIG_FILE}: give a new or "
                              "empty folder (an earlier genai export is replaced)")
    if not dest.parent.is_dir():
        raise FileNotFoundError(f"genai output's parent folder {dest.parent} does not exist")
    home = dest if mount_point(dest) else dest.parent  # where the export is staged (inside a mounted volume)
    if not os.access(home, os.W_OK):
        raise PermissionError(f"genai output's {'folder' if home == dest else 'parent folder'} {home} is not "
                              "writable")
    return dest


def _model_dir(model: nn.Module) -> Path | None:
    """The local directory the model was loaded from (`from_pretrained(dir)`), if any."""
    path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    return Path(path) if path and Path(path).is_dir() else None


def _copy_tokenizer(source, tmp: Path, dest: Path) -> None:
    """Copy the tokenizer files of directory `source` (or `save_pretrained` a tokenizer object) into `tmp`;
    warn in one line when there are none."""
    if source is not None and hasattr(source, "save_pretrained"):
        source.save_pretrained(str(tmp))
        return
    found = [Path(source) / f for f in TOKENIZER_FILES if Path(source, f).is_file()] if source is not None else []
    for file in found:
        shutil.copy2(file, tmp / file.name)
    if not any(f.name in ("tokenizer.json", "tokenizer.model") for f in found):
        where = f"in {source}" if source is not None else "(no tokenizer= given and no local model directory)"
        warnings.warn(f"genai export {dest.name}: no tokenizer files {where}; og.Model loads, but og.Tokenizer "
                      "needs tokenizer.json (pass tokenizer= a directory or tokenizer)",
                      MissingTokenizerWarning, stacklevel=3)
