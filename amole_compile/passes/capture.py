"""Capture a model as FX graphs with `torch.export.export(strict=False)`, before decompositions.

Two ways:

- whole model: one ExportedProgram (`capture`);
- per block (`capture_blocks` -> `BlockCapture`s): the items of the model's outermost `nn.ModuleList`s (its
  layers; a list of lists gives the inner items) are each captured alone, on the inputs recorded during one
  forward of the example inputs (each block's forward is wrapped for that forward only: it records its
  arguments, and a block whose signature was already seen returns the earlier block's output instead of
  running; see `record_block_inputs`). Blocks of the same class, parameter shapes and input shapes share one
  capture (its analysis is replayed on the others); a block that does not export, or is never called as such
  (a container of sub-blocks), is split into its children, at any depth of nested lists. This does not depend
  on the whole model exporting (data-dependent MoE dispatch) and is what deep HF models use: one block is
  exported, not 32.

HF models get example inputs synthesised from their config (no tokenizer, no downloads); other modules take
`example_inputs=` (a tuple of positional args, or a dict of keyword args). The model's training flags are
restored afterwards, whatever happens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
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
        limit = _sub(config, "text_config", "max_position_embeddings")  # XLNet: -1, no limit
        seq = min(_SEQ, limit) if isinstance(limit, int) and limit > 0 else _SEQ
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
def in_mode(model: nn.Module, training: bool = False):
    """Put every submodule in eval mode (`training`: in training mode) and restore each one's own flag
    afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def kept_state(model: nn.Module):
    """Within, the model's buffers and the random number generators may change (a training-mode forward: batch
    norm statistics, dropout draws); after, they are as before."""
    buffers = [(b, b.clone()) for b in model.buffers()]
    devices = sorted({b.device.index or 0 for b, _ in buffers if b.device.type == "cuda"} |
                     {p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        try:
            yield model
        finally:
            with torch.no_grad():
                for b, copy in buffers:
                    if b.device.type != "meta":
                        b.copy_(copy)


def example_args(model: nn.Module, example_inputs) -> tuple[tuple, dict]:
    """example_inputs (None: synthesised) -> (args, kwargs), with `use_cache=False` where the forward takes it and
    they do not say (`_without_cache`)."""
    if example_inputs is None:
        return (), synthesize_inputs(model)
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    elif isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    else:
        raise TypeError(f"example_inputs must be a tuple, a dict or a tensor, got {type(example_inputs).__name__}")
    return args, _without_cache(model, args, kwargs)


def _without_cache(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """kwargs, plus use_cache=False where the forward names a `use_cache` parameter (or takes **kwargs and has a
    config with `use_cache`, as Hugging Face models) that neither `args` nor `kwargs` set. A cache object handed
    to the blocks does not export: T5's, Whisper's and BART's decoders and a multimodal model's language model
    were split into pieces holding no attention, and got no adapters, silently. Discovery needs no cache."""
    if "use_cache" in kwargs:
        return kwargs
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return kwargs
    names = [p.name for p in params]
    if "use_cache" in names:
        given = names.index("use_cache") < len(args)
    else:
        hf = hasattr(getattr(model, "config", None), "use_cache")
        given = not (hf and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params))
    return kwargs if given else {**kwargs, "use_cache": False}


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _export(module: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    """With gradients on, as the model trains (a forward may branch on it: torch's inference fast paths); where
    that fails, without them: an op may refuse a forward whose backward it lacks (flex attention on CPU).
    torch.compile'd functions inside run as plain Python, which export traces."""
    with warnings.catch_warnings(), torch.compiler.set_stance("force_eager"):
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(module, args, kwargs, strict=False)
        except Exception as exc:
            try:
                with torch.no_grad():
                    return torch.export.export(module, args, kwargs, strict=False)
            except Exception:
                raise exc from None


def capture(model: nn.Module, example_inputs: tuple | dict | None = None) -> torch.export.ExportedProgram:
    """model -> ExportedProgram (non-strict, not decomposed)."""
    args, kwargs = example_args(model, example_inputs)
    with in_mode(model):
        try:
            return _export(model, args, kwargs)
        except Exception as exc:
            raise CaptureError(f"could not capture {type(model).__name__} with torch.export(strict=False): "
                               f"{_first_line(exc)}") from exc


@dataclasses.dataclass
class BlockCapture:
    """One group of identical blocks: the first one's program (None if it failed) and every member's name."""

    names: list[str]
    program: torch.export.ExportedProgram | None = None
    error: str | None = None
    split: bool = False  # it did not export, and its children were captured instead
    calls: dict[str, int] = dataclasses.field(default_factory=dict)  # member -> times the forward called it


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The items of the outermost nn.ModuleLists (a block inside a chosen block is not chosen again); an item
    that is itself a container (a ModuleList of sub-blocks, x-transformers style) gives its items instead."""
    blocks: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            blocks += _items(name, mod)
            inside.append(name)
    return blocks


def _items(name: str, container: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for i, child in container.named_children():
        full = f"{name}.{i}" if name else str(i)
        out += _items(full, child) if isinstance(child, (nn.ModuleList, nn.ModuleDict)) else [(full, child)]
    return out


def block_signature(block: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """What identical blocks share: class, parameter names and shapes, the tensor inputs' shapes and dtypes,
    and the other inputs' values."""
    def sig(v: object) -> object:
        if isinstance(v, torch.Tensor):
            return ("T", tuple(v.shape), str(v.dtype))
        if isinstance(v, (list, tuple)):
            return tuple(sig(x) for x in v)
        if isinstance(v, dict):
            return tuple(sorted((k, sig(x)) for k, x in v.items()))
        return repr(v) if isinstance(v, (int, float, bool, str, type(None))) else type(v).__name__

    params = tuple((n, tuple(p.shape), str(p.dtype)) for n, p in block.named_parameters())
    return type(block), params, sig(args), sig(kwargs)


def record_block_inputs(model: nn.Module, blocks: list[tuple[str, nn.Module]], args: tuple,
                        kwargs: dict, calls: dict[str, int] | None = None) -> dict[str, tuple[tuple, dict]]:
    """One forward of the example inputs; -> each called block's (args, kwargs) of its first call. `calls`, if
    given, receives how many times each block was called (ALBERT calls one block for every layer).

    Cheap by construction: a block called with the same signature (class, parameter shapes, input shapes) as
    an earlier one is not run; it returns that block's output. The forward runs on fake tensors (shapes only)
    and the recorded fakes become zero tensors of the same shape, dtype and device (export needs only their
    metadata); a model whose forward looks at values (data-dependent MoE dispatch) runs eagerly instead."""
    calls = {} if calls is None else calls
    try:
        with _quiet_export():
            return _record(model, blocks, args, kwargs, fake=True, calls=calls)
    except Exception:  # e.g. DynamicOutputShapeException: the forward looks at values
        return _record(model, blocks, args, kwargs, fake=False, calls=calls)


def _record(model: nn.Module, blocks: list[tuple[str, nn.Module]], args: tuple, kwargs: dict,
            fake: bool, calls: dict[str, int]) -> dict[str, tuple[tuple, dict]]:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils._pytree import tree_map

    seen: dict[str, tuple[tuple, dict]] = {}
    calls.clear()
    outputs: dict[tuple, object] = {}
    saved = []
    for name, block in blocks:
        def forward(*a, _name=name, _block=block, _orig=block.forward, **kw):
            seen.setdefault(_name, (a, dict(kw)))
            calls[_name] = calls.get(_name, 0) + 1
            key = block_signature(_block, a, kw)
            if key not in outputs:
                outputs[key] = _orig(*a, **kw)
            return outputs[key]
        saved.append(wrap_forward(block, forward))
    mode = fake_tensors() if fake else torch.compiler.set_stance("force_eager")  # (see probe_forward)
    try:
        with in_mode(model), torch.no_grad(), warnings.catch_warnings(), mode:
            warnings.simplefilter("ignore")
            model(*args, **kwargs)
    finally:
        unwrap_forwards(saved)
    if not fake:
        return seen

    def real(v: object) -> object:
        if isinstance(v, FakeTensor):
            return torch.zeros(v.shape, dtype=v.dtype, device=v.device)
        return v

    return {name: tree_map(real, inputs) for name, inputs in seen.items()}


def wrap_forward(block: nn.Module, forward) -> tuple[nn.Module, bool, object]:
    """Set `forward` on the instance `block` -> what `unwrap_forwards` needs to put its own back."""
    saved = (block, "forward" in block.__dict__, block.__dict__.get("forward"))
    block.forward = forward
    return saved


def unwrap_forwards(saved: list[tuple[nn.Module, bool, object]]) -> None:
    """Undo `wrap_forward`s, the last first: an instance-level forward the block had before is put back, else
    removed. A module shared by several blocks (one activation instance in every layer) is wrapped once per
    block, each wrapper over the last; undone first to last, the first undo's removal would be undone by the
    second's put-back, leaving a wrapper (and its cached outputs) on the model."""
    for block, had, fwd in reversed(saved):
        if had:
            block.forward = fwd
        else:
            del block.forward


REAL_PROBE_PARAMS = 300_000_000  # on CPU, a real forward of a model this small costs less than a fake one


def probe_forward(model: nn.Module, args: tuple, kwargs: dict, prefer: str = "", training: bool = False) -> str:
    """One forward of the example inputs in eval mode (`training`: in training mode, its buffers and the random
    generators restored after: `kept_state`; every module's own flag restored after), without gradients -> how
    it ran, "real" or "fake". On fake tensors (shapes only, no compute) when a real forward
    would cost more: on fake tensors each op costs ~0.3 ms of dispatch (240 ms for an 8-layer h512 Llama, whose
    real forward of 2 x 8 tokens takes 44 ms on one CPU thread), so a model on CPU of up to `REAL_PROBE_PARAMS`
    parameters, or on a GPU or the meta device, runs for real (on one CPU thread). Whichever fails (quantized
    layers under fake tensors, data-dependent ops on meta) falls back to the other; failing both ways raises the
    real error. `prefer` ("real" or "fake"): try that way first (how an earlier forward of the model ran).
    torch.compile'd functions inside run as plain Python (the same values; nothing compiled for a probe, and no
    compiled kernel that is wrong on this device, as flex attention's on CPU, misleads `find_rows`)."""

    first = next(model.parameters(), None)
    real_first = prefer == "real" if prefer else first is None or first.device.type != "cpu" or \
        sum(p.numel() for p in model.parameters()) <= REAL_PROBE_PARAMS
    failed: dict[str, Exception] = {}
    state = kept_state(model) if training else contextlib.nullcontext()
    with in_mode(model, training), state, torch.no_grad(), torch.compiler.set_stance("force_eager"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for how in ("real", "fake") if real_first else ("fake", "real"):
            try:
                _run(model, args, kwargs, how == "fake")
                return how
            except Exception as exc:
                failed[how] = exc
    raise failed["real"]


@contextlib.contextmanager
def fake_tensors():
    """Within: a `FakeTensorMode` (shapes only, non-fake inputs allowed), with torch.compile'd functions run as
    plain Python (`set_stance("force_eager")`, which leaves their caches alone). Compiled code (inductor's
    kernels, as in transformers' flex-attention block mask) reads data pointers, and on fake tensors that
    crashed the process (a segmentation fault inside `plan`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.compiler.set_stance("force_eager"), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def _run(model: nn.Module, args: tuple, kwargs: dict, fake: bool) -> None:
    if fake:
        with _quiet_export(), fake_tensors():
            model(*args, **kwargs)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few tokens: threads cost more than they save (20x on a busy 2-core machine)
    try:
        model(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def capture_blocks(model: nn.Module, example_inputs=None, depth: int = 4) -> list[BlockCapture]:
    """Capture each block alone (see the module docstring); a block that does not export (an MoE block with
    data-dependent dispatch), or one never called as such (a container of sub-blocks), is split into its
    children, down to `depth` levels: attention is found at any depth of nested lists. Raises CaptureError when the
    model has no blocks or its eager forward fails."""
    blocks = find_blocks(model)
    if not blocks:
        raise CaptureError(f"{type(model).__name__} has no nn.ModuleList of blocks to capture one by one")
    watch = [(f"{n}.{c}" if c else n, m) for n, b in blocks for c, m in b.named_modules()
             if not isinstance(m, (nn.ModuleList, nn.ModuleDict)) and c.count(".") < depth]
    args, kwargs = example_args(model, example_inputs)
    calls: dict[str, int] = {}
    try:
        inputs = record_block_inputs(model, watch, args, kwargs, calls)
    except Exception as exc:
        raise CaptureError(f"could not run {type(model).__name__} eagerly to record its blocks' inputs: "
                           f"{_first_line(exc)}") from exc
    groups: dict[tuple, BlockCapture] = {}
    recorded: dict[tuple, str] = {}  # group -> the module its children's inputs were recorded on

    def visit(name: str, like: str, module: nn.Module, level: int) -> None:
        """Capture `name`, whose inputs are those recorded for `like` (itself, or the same submodule of an
        identical block that the recording forward did not run)."""
        if like not in inputs:  # not called as such (a container of sub-blocks): look inside
            for child, mod in module.named_children() if level < depth else ():
                visit(f"{name}.{child}", f"{like}.{child}", mod, level + 1)
            return
        key = block_signature(module, *inputs[like])
        group = groups.get(key)
        if group is None:
            group = groups[key] = BlockCapture([name])
            recorded[key] = like
            try:
                group.program = _export(module, *inputs[like])
            except Exception as exc:
                group.error = _first_line(exc)
        else:
            group.names.append(name)
        group.calls[name] = calls.get(name, 1)
        if group.program is None and level < depth:
            group.split = True
            for child, mod in module.named_children():
                visit(f"{name}.{child}", f"{recorded[key]}.{child}", mod, level + 1)

    with in_mode(model), _quiet_export():
        for name, block in blocks:
            visit(name, name, block, 0)
    return list(groups.values())


@contextlib.contextmanager
def _quiet_export():
    """torch.export logs the whole graph when it fails; a failed block is expected here, and reported."""
    import logging

    loggers = [logging.getLogger(n) for n in ("torch._dynamo", "torch.export", "torch._export",
                                              "torch.fx.experimental.symbolic_shapes", "torch._subclasses")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)
