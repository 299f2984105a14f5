"""The graphs' interfaces: thin wrapper modules that give an HF model flat tensors in and out, named as Optimum
names them, plus their example inputs and dynamic shapes.

scoring / prefill   input_ids, attention_mask [B, S] int64 (+ position_ids [B, S] for causal LMs)
                    -> logits [B, S, V] (last_hidden_state for a bare encoder)
decoder (kv_cache)  input_ids, attention_mask [B, P + S], position_ids, past_key_values.<i>.key|value
                    [B, H, P, Dh] -> logits, present.<i>.key|value [B, H, P + S, Dh]
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect

import torch
from torch import nn

BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
_EXAMPLE = {"batch": 2, "seq": 8, "kv_seq": 3, "past": 5}  # no 0/1 sizes: torch.export would specialise them


def is_causal_lm(model: nn.Module) -> bool:
    """A generating decoder (HF `can_generate()`), as opposed to an encoder."""
    can = getattr(model, "can_generate", None)
    return bool(can()) if callable(can) else False


def accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def primary_output(out) -> tuple[str, torch.Tensor]:
    """An HF model output -> ('logits', tensor) or ('last_hidden_state', tensor)."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None) if not isinstance(out, dict) else out.get(name)
        if isinstance(value, torch.Tensor):
            return name, value
    raise TypeError(f"the model's output {type(out).__name__} has neither logits nor last_hidden_state")


def _rows(model: nn.Module, adapters: tuple[str, ...] | None, adapter_ids):
    """A context in which row i runs `adapters[adapter_ids[i]]` (-1: none); nothing when `adapters` is None."""
    if adapters is None:
        return contextlib.nullcontext()
    from ..model.batch import mixed_batch

    return mixed_batch(model, adapter_ids, adapters, what="ONNX export")


class ScoringGraph(nn.Module):
    """(input_ids, attention_mask[, position_ids][, adapter_ids]) -> logits, with the HF cache switched off."""

    def __init__(self, model: nn.Module, positions: bool, causal: bool,
                 adapters: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.model, self.positions, self.causal, self.adapters = model, positions, causal, adapters

    def forward(self, input_ids, attention_mask, position_ids=None, adapter_ids=None):
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.positions:
            kw["position_ids"] = position_ids
        if self.causal:
            kw["use_cache"] = False
        with _rows(self.model, self.adapters, adapter_ids):
            return primary_output(self.model(**kw))[1]


class DecoderGraph(nn.Module):
    """(input_ids, attention_mask, position_ids, past) -> (logits, *flat present), a DynamicCache inside.

    `past` is a flat tuple key_0, value_0, key_1, value_1, ...; a past of length 0 makes this the prefill graph.
    """

    def __init__(self, model: nn.Module, num_layers: int, adapters: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.model, self.num_layers, self.adapters = model, num_layers, adapters

    def forward(self, input_ids, attention_mask, position_ids, past, adapter_ids=None):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        with _rows(self.model, self.adapters, adapter_ids):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


@dataclasses.dataclass
class GraphSpec:
    """What torch.export / torch.onnx.export need for one graph."""

    module: nn.Module
    args: tuple
    dynamic_shapes: tuple | None
    input_names: list[str]
    output_names: list[str]


def left_padded_mask(batch: int, length: int) -> torch.Tensor:
    """[batch, length] int64 ones, the first row left-padded by 2 (an example that is not all ones)."""
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[0, :2] = 0
    return mask


def positions_from_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    """HF generate's position ids: cumsum(mask) - 1, padding at 1; the last `length` columns."""
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return pos[:, -length:]


def _example_ids(model: nn.Module, batch: int, seq: int) -> torch.Tensor:
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2) or 2)  # a plain module: ids 1
    return torch.arange(batch * seq, dtype=torch.long).reshape(batch, seq) % max(vocab - 1, 1) + 1


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _example_adapter_ids(batch: int, adapters: tuple[str, ...], device) -> torch.Tensor:
    """[batch] int64 cycling through -1 (none) and the adapters' ids."""
    return torch.arange(batch, device=device) % (len(adapters) + 1) - 1


def with_adapter_ids(spec: GraphSpec, adapters: tuple[str, ...] | None) -> GraphSpec:
    """`spec` with a last `adapter_ids` [batch] int64 input (row i runs adapters[adapter_ids[i]], -1: none)."""
    if adapters is None:
        return spec
    spec.module.adapters = adapters
    skipped = isinstance(spec.module, ScoringGraph) and not spec.module.positions
    gap = (None,) if skipped else ()  # the position_ids argument a graph without positions leaves out
    ids = _example_adapter_ids(spec.args[0].shape[0], adapters, spec.args[0].device)
    args = spec.args + gap + (ids,)
    dims = None if spec.dynamic_shapes is None else tuple(spec.dynamic_shapes) + gap + ({0: BATCH},)
    return GraphSpec(spec.module, args, dims, spec.input_names + ["adapter_ids"], spec.output_names)


def scoring_spec(model: nn.Module, dynamic: bool) -> GraphSpec:
    """The prefill / scoring graph of a causal LM or an encoder."""
    _check_scorable(model)
    causal = is_causal_lm(model)
    positions = causal and accepts(model, "position_ids")
    b, s = (_EXAMPLE["batch"], _EXAMPLE["seq"]) if dynamic else (1, _EXAMPLE["seq"])
    dev = _device(model)
    ids, mask = _example_ids(model, b, s).to(dev), left_padded_mask(b, s).to(dev)
    args = (ids, mask) + ((positions_from_mask(mask, s),) if positions else ())
    wrapper = ScoringGraph(model, positions, causal)
    with torch.no_grad():
        out_name = primary_output(model(input_ids=ids, attention_mask=mask))[0]
    names = ["input_ids", "attention_mask"] + (["position_ids"] if positions else [])
    dims = tuple({0: BATCH, 1: SEQ} for _ in names) if dynamic else None
    return GraphSpec(wrapper, args, dims, names, [out_name])


def _check_scorable(model: nn.Module) -> None:
    """A TypeError naming what is missing where the model is not a causal LM or an encoder over token ids (the
    scoring graph's inputs: input_ids and attention_mask)."""
    name = type(model).__name__
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise TypeError(f"export_onnx writes the graph of a causal LM or an encoder over input_ids; {name} is an "
                        "encoder-decoder, whose decoder needs inputs of its own: not supported")
    main = getattr(model, "main_input_name", "input_ids")  # an HF model's first input: pixel_values for a ViT
    if main != "input_ids":
        raise TypeError(f"export_onnx writes the graph of a causal LM or an encoder over input_ids; {name} reads "
                        f"{main}: not supported")
    params = inspect.signature(model.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    missing = [n for n in ("input_ids", "attention_mask") if n not in params]
    if missing:
        raise TypeError(f"export_onnx writes the graph of a causal LM or an encoder over input_ids and "
                        f"attention_mask; {name}.forward takes no {' and no '.join(missing)}")


def cache_layout(model: nn.Module) -> list[tuple[int, int, torch.dtype]]:
    """(heads, head_dim, dtype) of each layer's KV cache, read off a 2-token forward."""
    dev = _device(model)
    with torch.no_grad():
        out = model(input_ids=_example_ids(model, 1, 2).to(dev), use_cache=True)
    layers = getattr(out.past_key_values, "layers", None)
    if not layers:
        raise TypeError(f"{type(model).__name__} returned no DynamicCache layers; kv_cache export needs an HF "
                        "causal LM with a key/value cache")
    return [(k.keys.shape[1], k.keys.shape[3], k.keys.dtype) for k in layers]


def decoder_spec(model: nn.Module, dynamic: bool) -> GraphSpec:
    """The decoding graph with flat past / present key-value tensors."""
    if not is_causal_lm(model):
        raise TypeError(f"kv_cache=True needs a causal LM that generates; {type(model).__name__} does not")
    layout = cache_layout(model)
    b, s, p = (_EXAMPLE["batch"], _EXAMPLE["kv_seq"], _EXAMPLE["past"]) if dynamic else (1, 1, _EXAMPLE["seq"])
    dev = _device(model)
    mask = left_padded_mask(b, p + s).to(dev)
    past = tuple(torch.randn(b, h, p, dh, dtype=dt, device=dev) for h, dh, dt in layout for _ in range(2))
    args = (_example_ids(model, b, s).to(dev), mask, positions_from_mask(mask, s).to(dev), past)
    kv = [f"{i}.{t}" for i in range(len(layout)) for t in ("key", "value")]
    names = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{n}" for n in kv]
    outs = ["logits"] + [f"present.{n}" for n in kv]
    dims = None
    if dynamic:
        flat = tuple({0: BATCH, 2: PAST} for _ in past)
        dims = ({0: BATCH, 1: SEQ}, {0: BATCH, 1: TOTAL}, {0: BATCH, 1: SEQ}, flat)
    return GraphSpec(DecoderGraph(model, len(layout)), args, dims, names, outs)
