"""Hugging Face checkpoints of a transformed model: `save_pretrained`, Trainer resume, the base state dict.

- **save_pretrained** writes the base model under its original key names (so that `from_pretrained(d)` is the
  base model, with its own weights) and the adapters beside it in our own files (`amole_config.json`,
  `adapters.safetensors`; `load_adapters(base, d)` restores them).
- **Trainer checkpoints** (`checkpoint-N`, a save from `Trainer._save_checkpoint`) hold the adapters and an empty
  `model.safetensors` marker, and reference the base instead of copying it (`base_ref.py`), as PEFT's do.
- **load_state_dict** (Trainer resume, best-model reload) of such a checkpoint into the transformed model: the
  base keys go back under `.base_layer.`, and the adapters are read from the checkpoint directory. A state dict
  with base weights but no adapters, whose directory cannot be found, raises instead of leaving the adapters
  as they were. A checkpoint that references its base is checked against the model's base (a different one is
  refused by name); the base keys it does not hold are then not reported missing (`load_post_hook`).

`integrations/patches.py` installs both on the model (an instance `save_pretrained`, a `load_state_dict`
pre-hook) and lists the third-party objects `save_pretrained` patches for the duration of its call.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from ..files import atomic_write, folder_lock
from ..integrations.distributed import full_tensor, unwrap
from ..model.projection import ProjectionAdapters
from ..model.state import GRAPH_PREFIX, adapter_state, key_prefixes, state_of, swapped
from .base_ref import check_same_base, reference
from .folder import save_staged
from .format import (
    CONFIG_FILE,
    has_adapters,
    read_adapter_tensors,
    read_config_json,
    refuse_foreign,
    write_adapters,
)

log = logging.getLogger("amole_compile")


def split_state(model: nn.Module, state: Mapping[str, torch.Tensor], prefix: str = ""):
    """A transformed model's state dict -> (base state dict under the original key names, adapter tensors under
    the canonical `<module>.adapters.<name>.<role>.<param>` names)."""
    pairs = key_prefixes(model) + [(f"{n}.adapters.", f"{n}.adapters.", True) for n, m in model.named_modules()
                                   if isinstance(m, ProjectionAdapters) and n.startswith(GRAPH_PREFIX + ".")]
    base, adapters = {}, {}
    for key, value in state.items():
        rel = key[len(prefix):] if key.startswith(prefix) else None
        match = next(((real, canon, ours) for real, canon, ours in pairs if rel is not None and rel.startswith(real)),
                     None)
        if match is None:
            base[key] = value
        elif match[2]:
            adapters[match[1] + rel[len(match[0]):]] = value
        else:
            base[prefix + match[1] + rel[len(match[0]):]] = value
    return base, adapters


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with its original key names: `<m>.base_layer.<p>` becomes `<m>.<p>` and the
    adapters' entries are dropped, so that

        model.save_pretrained(d, state_dict=base_state_dict(model))

    writes a checkpoint `AutoModel...from_pretrained(d)` loads as the plain base model. Accepts the model as the
    loop holds it (DDP, torch.compile, FSDP2). Under FSDP2 the shards are gathered into full tensors, a
    collective: call it on every rank (and save on rank 0 only).
    """
    model = unwrap(model)
    base, _ = split_state(model, model.state_dict())
    return {k: full_tensor(v) for k, v in base.items()}


# ---- save_pretrained ------------------------------------------------------------------------------------------
def save_pretrained(self: nn.Module, save_directory, is_main_process: bool = True, state_dict=None, **kwargs):
    """`save_pretrained` of a transformed model: the base model as transformers saves it (original key names,
    loadable by `from_pretrained`) plus the adapters in `amole_config.json` / `adapters.safetensors`, as one
    transaction (`folder.save_staged`)."""
    if state_dict is None:
        state_dict = self.state_dict()
    base, adapters = split_state(self, state_dict)
    if not adapters:  # e.g. state_dict=base_state_dict(model): the adapters come from the model itself
        adapters = {k: v.detach() for k, v in adapter_state(self).items()}
    adapters = {k: full_tensor(v) for k, v in adapters.items()}

    def save_base(directory) -> object:
        with peft_flag_off(self), quantizer_renamed(self, base):
            return type(self).save_pretrained(self, directory, is_main_process=is_main_process, state_dict=base,
                                              **kwargs)

    dest = Path(os.path.abspath(save_directory))  # "." has no name to stage beside
    if _trainer_checkpoint():
        return _save_referencing_base(self, dest, base, adapters) if is_main_process else None
    if not is_main_process or dest.is_file():  # other ranks only join transformers' collectives; a file: its error
        return save_base(save_directory)
    return save_staged(self, dest, save_base, adapters)


MARKER = "adapters only: the base is referenced in amole_config.json (`base`), see amole_compile.checkpoint.base_ref"
SAFE_WEIGHTS = "model.safetensors"  # the name the Trainer's resume looks for


def _trainer_checkpoint(depth: int = 16) -> bool:
    """Is this save a Trainer checkpoint: `_save_checkpoint` of a `transformers.Trainer` (or of a subclass's
    override, such as TRL's) on the stack? A save the user asks for (`save_pretrained`, `trainer.save_model()`)
    writes the whole model."""
    trainer = sys.modules.get("transformers.trainer")
    frame = inspect.currentframe()
    try:
        for _ in range(depth):
            frame = frame.f_back if frame is not None else None
            if frame is None or trainer is None:
                return False
            if frame.f_code.co_name == "_save_checkpoint" and isinstance(frame.f_locals.get("self"),
                                                                          trainer.Trainer):
                return True
        return False
    finally:
        del frame


def _save_referencing_base(model: nn.Module, dest: Path, base: dict[str, torch.Tensor],
                           adapters: dict[str, torch.Tensor]) -> None:
    """A Trainer checkpoint: the adapters with a reference to the base (`base_ref.reference` of the base state
    dict `base`) in the manifest, committed last, after the empty `model.safetensors` marker that the Trainer's
    resume looks for."""
    from safetensors.torch import save_file

    ref = reference(model, base)
    dest.mkdir(parents=True, exist_ok=True)
    with folder_lock(dest):
        refuse_foreign(dest)
        atomic_write(dest / SAFE_WEIGHTS, lambda tmp: save_file({}, tmp, metadata={"format": "pt",
                                                                                   "amole_compile": MARKER}))
        write_adapters(model, dest, adapters, base=ref)


@contextlib.contextmanager
def peft_flag_off(model: nn.Module) -> Iterator[None]:
    """The Trainer's PEFT flag that a transformed quantized base carries (row `trainer_peft_flag`) off while
    transformers writes the base: with it on, `save_pretrained` writes a PEFT adapter instead of the model."""
    record = state_of(model)
    ours = record is not None and record.token("trainer_peft_flag") is not None
    if ours:
        model._hf_peft_config_loaded = False
    try:
        yield
    finally:
        if ours:
            model._hf_peft_config_loaded = True


@contextlib.contextmanager
def quantizer_renamed(model: nn.Module, base: dict[str, torch.Tensor]) -> Iterator[None]:
    """A quantized base's `hf_quantizer.get_state_dict_and_metadata` replaces the state dict it is given by its
    own (quantization state included), read from `model.state_dict()` under the adapted names: for the call,
    the model's `state_dict` gives the base names instead."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        yield
        return
    own = quantizer.get_state_dict_and_metadata

    def renamed(m, *a, **k):
        model.__dict__["state_dict"] = lambda *_a, **_k: dict(base)  # what it reads, names and metadata alike
        try:
            sd, meta = own(m, *a, **k)
        finally:
            del model.__dict__["state_dict"]
        return (base if sd is None else sd), meta

    quantizer.get_state_dict_and_metadata = renamed
    try:
        yield
    finally:
        del quantizer.get_state_dict_and_metadata


# ---- resume ---------------------------------------------------------------------------------------------------
_REFERENCED: contextvars.ContextVar[tuple[int, str] | None] = contextvars.ContextVar("amole_base_referenced",
                                                                                       default=None)


def load_pre_hook(module: nn.Module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                  error_msgs) -> None:
    """Base-named keys of adapted layers go under `.base_layer.`; missing adapters come from the checkpoint's
    directory (found among the calling transformers/accelerate frames) or the load raises. A checkpoint that
    references its base (no base keys) is checked against this model's base first (`_load_referencing_base`)."""
    _REFERENCED.set(None)
    renamed = 0
    for name, mod in swapped(module):
        p = f"{prefix}{name}." if name else prefix
        for key in [k for k in state_dict if k.startswith(p)]:
            rest = key[len(p):]
            if not rest.startswith(mod.OWN) and not _ours(rest, mod):
                state_dict[f"{p}base_layer.{rest}"] = state_dict.pop(key)
                renamed += 1
    wanted = [f"{prefix}{k}" for k in _adapter_keys(module)]
    if any(k in state_dict for k in wanted):
        return
    if not renamed:
        _load_referencing_base(module, state_dict, prefix)
        return
    directory = _checkpoint_dir()
    if directory is None:
        raise ValueError(
            f"this state dict holds {type(module).__name__}'s base weights under their original names but none "
            "of its AdaMoLE adapters: loading it would leave the adapters as they are. Load a checkpoint saved "
            "by save_pretrained with `amole_compile.load_adapters(model, dir)` (or a base model with "
            "from_pretrained(dir)), or pass the transformed model's own state_dict")
    _put_adapters(module, state_dict, prefix, directory)


def _put_adapters(module: nn.Module, state_dict, prefix: str, directory: Path) -> None:
    """The adapters of `directory` into the state dict being loaded, under the model's own keys (checked against
    the model by `read_adapter_tensors`, the adapter that trained included)."""
    tensors = read_adapter_tensors(module, directory)
    real = {canon: key for key, canon in _adapter_names(module).items()}
    for key, value in tensors.items():
        state_dict[f"{prefix}{real.get(key, key)}"] = value
    log.info("loaded the adapters of %s with its base weights", directory)


def _load_referencing_base(module: nn.Module, state_dict, prefix: str) -> None:
    """A state dict with neither base keys of adapted layers nor adapters: from a Trainer checkpoint that
    references its base, check that this model has that base, put the checkpoint's adapters in, and let
    `load_post_hook` drop the base keys from the missing ones. Otherwise (not loading such a checkpoint) leave
    the load as it is; a checkpoint whose marker is there but whose adapters are not (an interrupted save)
    raises."""
    folder = _checkpoint_dir(require_adapters=False)
    if folder is None:
        return
    if not has_adapters(folder):
        if _is_marker(folder / SAFE_WEIGHTS):
            raise ValueError(f"the checkpoint {folder} being loaded holds no AdaMoLE adapters (no {CONFIG_FILE}) "
                             "beside its adapters-only marker: its save was interrupted. Resume from an earlier "
                             "checkpoint")
        return
    ref = read_config_json(folder)[0].get("base")
    if ref is None:
        return
    base, _ = split_state(module, module.state_dict())
    check_same_base(module, base, ref, folder)
    _put_adapters(module, state_dict, prefix, folder)
    _REFERENCED.set((id(module), prefix))


def load_post_hook(module: nn.Module, incompatible_keys) -> None:
    """After a load from a checkpoint that references its base (checked by `_load_referencing_base`): the base
    keys it does not hold are not missing (the model keeps its base); the adapters' keys still are."""
    marked = _REFERENCED.get()
    if marked is None or marked[0] != id(module):
        return
    _REFERENCED.set(None)
    ours = {f"{marked[1]}{k}" for k in _adapter_keys(module)}
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys
                                         if k in ours or not k.startswith(marked[1])]


def _is_marker(file: Path) -> bool:
    """Is `file` the empty `model.safetensors` of an adapters-only checkpoint?"""
    if not file.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            return (f.metadata() or {}).get("amole_compile") == MARKER
    except Exception:  # not safetensors, or unreadable: not our marker
        return False


def _adapter_names(module: nn.Module) -> dict[str, str]:
    """Every adapter parameter's state-dict key -> its canonical name."""
    _, names = split_state(module, {k: k for k, _ in _adapter_params(module)})
    return {key: canon for canon, key in names.items()}


def _adapter_params(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, mod in module.named_modules():
        if isinstance(mod, ProjectionAdapters):
            out += [(f"{name}.adapters.{p}" if name else f"adapters.{p}", t)
                    for p, t in mod.adapters.named_parameters()]
    return out


def _adapter_keys(module: nn.Module) -> list[str]:
    return [k for k, _ in _adapter_params(module)]


def _ours(rest: str, mod: nn.Module) -> bool:
    """Is `rest`, a key under swapped module `mod`, a canonical adapter key (an nn.MultiheadAttention's
    `in_proj_weight.adapters....`) rather than a base layer's?"""
    return any(rest.startswith(f"{sub}.adapters.") for sub in mod.holders() if sub)


def _checkpoint_dir(depth: int = 12, require_adapters: bool = True) -> Path | None:
    """The checkpoint folder a calling transformers / accelerate frame is loading from (Trainer's
    `resume_from_checkpoint`, `best_model_checkpoint`, a sharded checkpoint's folder): the first folder, or
    folder of a file, among those frames' locals that holds model weights or our adapters. Only that folder is
    read: one without our adapters raises (never the adapters of another folder, such as its parent).

    Why a frame walk (checked against transformers 5.24): `Trainer._load_from_checkpoint` and `_load_best_model`
    hand the model only `load_state_dict(safetensors.load_file(...))`, a plain dict without the file's path or
    metadata; resuming loads the weights before the first callback event (`on_train_begin`), `TrainerState`
    holds no checkpoint path, and a callback or a Trainer subclass would be user code (the point is that a plain
    `Trainer` resumes). The PEFT branch that passes the directory (`model.load_adapter(dir)`) runs only for
    `PeftModel` instances and only when the checkpoint has no `model.safetensors`. When nothing is found, the
    load raises (see `load_pre_hook`), so a miss is loud, never a silent drop."""
    frame = inspect.currentframe()
    try:
        for _ in range(depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            if not str(frame.f_globals.get("__name__", "")).startswith(("transformers", "accelerate")):
                continue
            for value in frame.f_locals.values():
                folder = _checkpoint_of(value)
                if folder is None:
                    continue
                if require_adapters and not has_adapters(folder):
                    raise ValueError(
                        f"the checkpoint {folder} being loaded holds the base weights but no AdaMoLE adapters (no "
                        f"{CONFIG_FILE}): resume reads the adapters of that checkpoint only. Resume from a "
                        "checkpoint a transformed model saved, or load adapters with amole_compile.load_adapters")
                return folder
        return None
    finally:
        del frame


_WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def _checkpoint_of(value) -> Path | None:
    """The folder a frame local names (itself, or the folder of an existing file) when it holds model weights
    or our adapters, else None."""
    if not isinstance(value, (str, Path)) or not str(value):
        return None
    path = Path(value)
    try:
        folder = path if path.is_dir() else path.parent if path.is_file() else None
        if folder is not None and (has_adapters(folder) or any(any(folder.glob(g)) for g in _WEIGHTS)):
            return folder
    except OSError:
        pass
    return None
