"""Everything amole_compile installs on a transformed model or patches in another library, in one table.

Each row says what is patched, why, and the versions the need was checked with; `tests/integrations/
test_patches.py` has a test per row, pinned to `Patch.pin`. `attach` walks the rows that `transform` installs
(`when == "transform"`), pushing each installed row's undo token on the model's record (`model/state.py`);
`detach` pops them in reverse. The rows with `when == "save_pretrained"` are applied by
`checkpoint/pretrained.save_pretrained` for the duration of its call only.

Tokens are plain data or objects that copy with the model (a deepcopy maps the modules they name to the
copy's); the dynamo-flag token re-registers itself when it is copied or unpickled, so a copy holds the flag too.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..checkpoint.pretrained import load_post_hook, load_pre_hook, peft_flag_off, quantizer_renamed, save_pretrained
from ..model.attention import AdaMoLEMultiheadAttention
from ..model.state import ModelState
from . import quantized
from .loss import post_forward, pre_forward

log = logging.getLogger("amole_compile")


@dataclasses.dataclass(frozen=True)
class Patch:
    """One row of the table."""

    name: str  # its key on the record's undo stack
    target: str  # what is patched or installed
    why: str
    checked: str  # the versions the need and the patch were checked with
    pin: dict[str, str]  # package -> the version range the row's test pins (`packaging` specifier)
    when: str  # "transform" (installed until untransform) or "save_pretrained" (during that call)
    install: Callable[[nn.Module], Any] | None = None  # -> undo token; None: nothing was installed
    remove: Callable[[nn.Module, Any], None] | None = None


# ---- the rows' install / remove -----------------------------------------------------------------------------
def _hooks(model: nn.Module) -> bool:
    model.register_forward_pre_hook(pre_forward, with_kwargs=True)
    model.register_forward_hook(post_forward, with_kwargs=True, always_call=True)  # also when the forward raises
    return True


def _unhook(model: nn.Module, _token) -> None:
    for hooks, fn in ((model._forward_pre_hooks, pre_forward), (model._forward_hooks, post_forward)):
        for key in [k for k, h in hooks.items() if h is fn]:
            del hooks[key]
            model._forward_hooks_with_kwargs.pop(key, None)
            model._forward_hooks_always_called.pop(key, None)
            model._forward_pre_hooks_with_kwargs.pop(key, None)


def _resume_hook(model: nn.Module) -> bool:
    model.register_load_state_dict_pre_hook(load_pre_hook)
    model.register_load_state_dict_post_hook(load_post_hook)
    return True


def _unresume(model: nn.Module, _token) -> None:
    pre = model._load_state_dict_pre_hooks
    for key in [k for k, h in pre.items() if getattr(h, "hook", h) is load_pre_hook]:
        del pre[key]
    post = model._load_state_dict_post_hooks
    for key in [k for k, h in post.items() if h is load_post_hook]:
        del post[key]


class _Bound:
    """`model.<name>(...)` -> `<function>(model, ...)`: unlike a bound method it pickles (by the function's
    qualified name) and `copy.deepcopy` rebinds it to the copy."""

    def __init__(self, fn: Callable, model: nn.Module) -> None:
        self.fn, self.model = fn, model

    def __call__(self, *args, **kwargs):
        return self.fn(self.model, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<amole_compile {self.fn.__name__.lstrip('_')} of {type(self.model).__name__}>"


def _override(attr: str, fn: Callable) -> Callable[[nn.Module], Any]:
    def install(model: nn.Module):
        if not callable(getattr(type(model), attr, None)) or attr in model.__dict__:
            return None
        model.__dict__[attr] = _Bound(fn, model)
        return True

    return install


def _unoverride(attr: str) -> Callable[[nn.Module, Any], None]:
    def remove(model: nn.Module, _token) -> None:
        if isinstance(model.__dict__.get(attr), _Bound):
            del model.__dict__[attr]

    return remove


def _non_reentrant(model: nn.Module) -> bool:
    funcs = [m.__dict__.get("_gradient_checkpointing_func") for m in model.modules()]
    funcs = [f for f in funcs if f is not None]
    return bool(funcs) and all(isinstance(f, functools.partial) and f.keywords.get("use_reentrant") is False
                               for f in funcs)


def enable_input_require_grads(model: nn.Module):
    """HF's `enable_input_require_grads`, skipped under non-reentrant checkpointing: its forward hook
    (`output.requires_grad_(True)` on the embeddings) is a graph break under torch.compile, and only reentrant
    checkpointing needs inputs that require grad to reach the adapters."""
    if _non_reentrant(model):
        log.info("amole_compile: non-reentrant activation checkpointing needs no input that requires grad; "
                 "skipping enable_input_require_grads (its hook is a torch.compile graph break)")
        return None
    return type(model).enable_input_require_grads(model)


def _input_grads(model: nn.Module):
    token = _override("enable_input_require_grads", enable_input_require_grads)(model)
    if token and _non_reentrant(model) and getattr(model, "_require_grads_hooks", None):
        type(model).disable_input_require_grads(model)  # checkpointing was enabled before the transform
        return "disabled"
    return token


def _uninput_grads(model: nn.Module, token) -> None:
    _unoverride("enable_input_require_grads")(model, token)
    if token == "disabled":
        type(model).enable_input_require_grads(model)


def _peft_flag(model: nn.Module):
    if getattr(model, "hf_quantizer", None) is None or getattr(model, "_hf_peft_config_loaded", False):
        return None
    model._hf_peft_config_loaded = True
    return True


def _unpeft_flag(model: nn.Module, _token) -> None:
    model._hf_peft_config_loaded = False


def _no_repack(model: nn.Module):
    """Turn the repack off; put back (and warn about) layers an eval forward already repacked."""
    turned, repacked = [], []
    for name, mod in model.named_modules():
        if getattr(mod, "support_avx512bf16_for_cpu", False):
            mod.support_avx512bf16_for_cpu = False
            turned.append(mod)
        if quantized.cpu_repacked(mod):
            quantized.undo_cpu_repack(mod)
            repacked.append(name)
    if repacked:
        warnings.warn(
            f"{len(repacked)} 4-bit layers (first: {repacked[0]}) were repacked by bitsandbytes for its CPU kernel "
            "by an eval forward before the transform, which rounded their block scales to bf16. They are put back "
            "in bitsandbytes' standard layout (a repacked layer passes no gradient to the layers below, and a "
            "save would scramble its scales), computing with the rounded scales: slightly off the checkpoint they "
            "were loaded from. Reload the base and transform it before any eval forward to keep it exact.",
            stacklevel=5)
    return turned or None


def _repack(model: nn.Module, turned: list[nn.Module]) -> None:
    for mod in turned:
        mod.support_avx512bf16_for_cpu = True


class HeldFlag:
    """A process-wide setting held at `VALUE` while any transformed model that needs it is alive: each such
    model's record holds a token, which the registry (per subclass) watches by weak reference. The first token
    sets the setting (remembering its earlier value); when the last one is released (untransform) or collected
    (its model dropped), the earlier value comes back. A copied or unpickled token registers itself, so a copy
    of a model holds the setting like the original."""

    VALUE = True
    WHY = ""
    _live: dict[int, weakref.ref] = {}
    _saved: bool | None = None

    def __init_subclass__(cls) -> None:
        cls._live, cls._saved = {}, None

    @classmethod
    def read(cls) -> bool | None:
        """The setting's value (None: this torch has no such setting)."""
        raise NotImplementedError

    @classmethod
    def write(cls, value: bool) -> None:
        """Set the setting."""
        raise NotImplementedError

    def __init__(self) -> None:
        self._hold()

    def __getstate__(self) -> dict:
        return {"held": True}  # not empty: copy and pickle then call __setstate__

    def __setstate__(self, state: dict) -> None:
        self._hold()

    def _hold(self) -> None:
        cls = type(self)
        now = cls.read()
        if now is None:
            return
        if not cls._live:
            cls._saved = now
        cls._live[id(self)] = weakref.ref(self, cls._collected)
        if now != cls.VALUE:
            cls.write(cls.VALUE)
            log.info("set %s = %s (%s); restored when no transformed model needing it is left", cls.__name__,
                     cls.VALUE, cls.WHY)

    def release(self) -> None:
        """Stop holding the setting (untransform)."""
        type(self)._live.pop(id(self), None)
        type(self)._restore_if_free()

    @classmethod
    def _collected(cls, ref: weakref.ref) -> None:
        for key in [k for k, r in cls._live.items() if r is ref]:
            del cls._live[key]
        cls._restore_if_free()

    @classmethod
    def _restore_if_free(cls) -> None:
        if not cls._live and cls._saved is not None:
            try:
                cls.write(cls._saved)
            except (AttributeError, TypeError):  # interpreter shutdown: torch is gone already
                return
            cls._saved = None

    @classmethod
    def holders(cls) -> int:
        """How many live tokens hold the setting."""
        return sum(r() is not None for r in cls._live.values())


class DynamoFlag(HeldFlag):
    """`torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint` (aux loss under compiled gradient
    checkpointing)."""

    NAME = "skip_fwd_side_effects_in_bwd_under_checkpoint"
    WHY = "aux loss under compiled gradient checkpointing"

    @classmethod
    def read(cls) -> bool | None:
        """The dynamo config flag (None on a torch without it)."""
        return getattr(torch._dynamo.config, cls.NAME, None)

    @classmethod
    def write(cls, value: bool) -> None:
        """Set the dynamo config flag."""
        setattr(torch._dynamo.config, cls.NAME, value)


class MhaFastpath(HeldFlag):
    """`torch.backends.mha.set_fastpath_enabled(False)` while a model holds an adapted nn.MultiheadAttention:
    the fast paths of MultiheadAttention, TransformerEncoderLayer and TransformerEncoder (eval, no grad) read
    the attention's weights themselves and would bypass its adapters."""

    VALUE = False
    WHY = "the fast path of nn.MultiheadAttention and the Transformer layers would bypass adapted attention"

    @classmethod
    def read(cls) -> bool | None:
        """torch.backends.mha.get_fastpath_enabled()."""
        return torch.backends.mha.get_fastpath_enabled()

    @classmethod
    def write(cls, value: bool) -> None:
        """torch.backends.mha.set_fastpath_enabled(value)."""
        torch.backends.mha.set_fastpath_enabled(value)


def _flag(model: nn.Module):
    return DynamoFlag() if DynamoFlag.read() is not None else None


def _mha_flag(model: nn.Module):
    return MhaFastpath() if any(isinstance(m, AdaMoLEMultiheadAttention) for m in model.modules()) else None


def _unflag(model: nn.Module, token: HeldFlag) -> None:
    token.release()


# ---- the table ------------------------------------------------------------------------------------------------
TORCH = {"torch": ">=2.13,<3"}
TRANSFORMERS = {"transformers": ">=5.0,<6"}
PATCHES: tuple[Patch, ...] = (
    Patch("aux_loss_hooks", "the model's forward pre-hook and forward hook (torch.nn.Module hooks)",
          "put coef * aux into the loss the model returns, so HF Trainer, TRL and plain loops train the routers "
          "with no subclass (integrations/loss.py)", "torch 2.13", TORCH, "transform", _hooks, _unhook),
    Patch("resume_hook", "the model's load_state_dict pre-hook and post-hook (torch.nn.Module hooks)",
          "Trainer resume and best-model reload hand load_state_dict base-named keys without adapters (or, from "
          "a checkpoint that references its base, nothing): rename them under .base_layer., check the "
          "referenced base, read the adapters from the checkpoint folder, and drop the referenced base's keys "
          "from the missing ones", "transformers 5.24-5.25",
          TRANSFORMERS, "transform", _resume_hook, _unresume),
    Patch("save_pretrained", "transformers PreTrainedModel.save_pretrained, overridden on the instance",
          "write the base under its own key names (loadable by from_pretrained) and the adapters in our own "
          "files; the inherited method would write the renamed .base_layer. keys, which reload as random "
          "weights", "transformers 5.23-5.25", TRANSFORMERS, "transform",
          _override("save_pretrained", save_pretrained), _unoverride("save_pretrained")),
    Patch("enable_input_require_grads",
          "transformers PreTrainedModel.enable_input_require_grads, overridden on the instance (and HF's hook "
          "removed when checkpointing was enabled before the transform; put back by untransform)",
          "its requires_grad_ hook on the embeddings is a torch.compile graph break, and non-reentrant "
          "checkpointing (HF's default) needs no input that requires grad", "transformers 5.24-5.25",
          TRANSFORMERS, "transform", _input_grads, _uninput_grads),
    Patch("trainer_peft_flag", "transformers PreTrainedModel._hf_peft_config_loaded = True (quantized bases)",
          "HF Trainer refuses to fine-tune a 'purely quantized' model unless it looks like a PEFT model; a "
          "transformed one has trainable adapters", "transformers 5.24-5.25", TRANSFORMERS, "transform",
          _peft_flag, _unpeft_flag),
    Patch("bnb_cpu_repack", "bitsandbytes Linear4bit.support_avx512bf16_for_cpu = False (and a layer repacked "
          "before the transform put back in the standard layout, for good: quantized.undo_cpu_repack)",
          "bitsandbytes >= 0.50 repacks a 4-bit layer on its first CPU eval forward, casting the block scales "
          "to bf16: lossy and lasting; the repacked layer passes no gradient through, and the first state_dict "
          "(save_pretrained, a Trainer checkpoint) unpacks it in place with its scales transposed",
          "bitsandbytes 0.50.2",
          {"bitsandbytes": ">=0.50,<0.51"}, "transform", _no_repack, _repack),
    Patch("dynamo_checkpoint_side_effects",
          "torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True (process-wide)",
          "each site records its aux loss on itself; under torch.compile that side effect inside an "
          "activation-checkpointed region is a graph break unless dynamo keeps the forward's side effects "
          "without replaying them in the recompute", "torch 2.13", TORCH, "transform", _flag, _unflag),
    Patch("mha_fastpath_off", "torch.backends.mha.set_fastpath_enabled(False) (process-wide), while a model holds "
          "an adapted nn.MultiheadAttention", "the fast paths of MultiheadAttention, TransformerEncoderLayer and "
          "TransformerEncoder (eval, no grad) read the attention's weights and run fused kernels, bypassing its "
          "forward and so its adapters (model/attention.py)", "torch 2.13", TORCH, "transform", _mha_flag, _unflag),
    Patch("peft_flag_during_save", "transformers PreTrainedModel._hf_peft_config_loaded = False",
          "with the flag on, save_pretrained writes a PEFT adapter instead of the base model",
          "transformers 5.24-5.25", TRANSFORMERS, "save_pretrained"),
    Patch("quantizer_state_dict",
          "transformers HfQuantizer.get_state_dict_and_metadata (instance attribute) and the model's state_dict",
          "a quantized base's quantizer replaces the state dict it is given by its own, read from "
          "model.state_dict() under the adapted names: it must read the base names", "transformers 5.24-5.25",
          TRANSFORMERS, "save_pretrained"),
)
SCOPED = {"peft_flag_during_save": peft_flag_off, "quantizer_state_dict": quantizer_renamed}  # used by that call
ROWS = {p.name: p for p in PATCHES}


def attach(model: nn.Module, record: ModelState) -> None:
    """Install every `transform` row that applies to `model`, pushing its token on the record's undo stack."""
    for row in PATCHES:
        if row.when != "transform" or record.token(row.name) is not None:
            continue
        token = row.install(model)
        if token is not None:
            record.undo.append((row.name, token))


def detach(model: nn.Module, record: ModelState, keep: int = 0) -> None:
    """Pop the record's undo stack down to its first `keep` entries, removing each installed row (last
    installed first)."""
    while len(record.undo) > keep:
        name, token = record.undo.pop()
        if name in ROWS and ROWS[name].remove is not None:
            ROWS[name].remove(model, token)
