"""`OnnxLM`: run a graph from `export_onnx` with onnxruntime: logits, and greedy generation with the KV cache.

    lm = OnnxLM("decoder.onnx")                  # CUDA provider when onnxruntime-gpu and a GPU are present
    lm.logits(input_ids, attention_mask)         # [B, S, V]
    lm.generate(input_ids, max_new_tokens=32)    # [B, S + new], greedy, equal to HF generate(do_sample=False)
    lm.generate(ids, 32, adapter_ids=["a", None])   # a graph exported with adapters=[...]: one per row

Position ids follow HF generate: cumsum(attention_mask) - 1, with padding at 1, so left-padded rows score as if
unpadded. Outputs come back as torch tensors for torch inputs and numpy arrays otherwise.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

REQUIRED_INPUTS = ("input_ids", "attention_mask")
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def default_providers() -> list[str]:
    """CUDA (then CPU) when onnxruntime-gpu is installed and a GPU is visible, else CPU."""
    import onnxruntime as ort

    gpu = os.path.exists("/dev/nvidiactl") and os.environ.get("CUDA_VISIBLE_DEVICES", None) != ""
    if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxLM:
    """A causal LM (or encoder, for `.logits`) exported by `amole_compile.export_onnx`, on onnxruntime."""

    def __init__(self, path: str | os.PathLike, providers: list | None = None, session_options=None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {self.path}")
        self.session = ort.InferenceSession(str(self.path), sess_options=session_options,
                                            providers=providers or default_providers())
        self.providers = self.session.get_providers()
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._check_interface()
        self.uses_positions = "position_ids" in self._inputs
        count = sum(bool(_PAST.match(n)) for n in self._inputs) // 2
        self._past = [f"past_key_values.{i}.{t}" for i in range(count) for t in ("key", "value")]
        self._present = [n.replace("past_key_values", "present") for n in self._past]
        self.num_layers = count
        self.has_cache = self.num_layers > 0
        vocab = next(o.shape[-1] for o in self.session.get_outputs() if o.name == "logits")
        self.vocab_size: int | None = vocab if isinstance(vocab, int) else None  # the logits' static last axis
        meta = self.session.get_modelmeta().custom_metadata_map.get("amole_adapters")
        self.adapters: list[str] | None = json.loads(meta) if meta else None
        if (self.adapters is None) != ("adapter_ids" not in self._inputs):
            raise ValueError(f"{self.path}: an adapter_ids input needs the amole_adapters metadata and vice versa")

    def _adapter_ids(self, adapter_ids, batch: int) -> np.ndarray | None:
        """Per-row adapters (names, ids into `self.adapters`, None / -1 for the base) -> [B] int64; checked."""
        if self.adapters is None:
            if adapter_ids is not None:
                raise ValueError(f"{self.path} was exported with one adapter; export with adapters=[...] for "
                                 "adapter_ids")
            return None
        if adapter_ids is None:
            raise ValueError(f"{self.path} stacks adapters {self.adapters}: pass adapter_ids, one per row (a name, "
                             "an index, or None / -1 for the base model)")
        rows = _to_numpy(adapter_ids)[0].tolist() if type(adapter_ids).__module__.startswith(("torch", "numpy")) \
            else list(adapter_ids)
        if len(rows) != batch:
            raise ValueError(f"adapter_ids has {len(rows)} entries for a batch of {batch} rows")
        out = []
        for row in rows:
            if row is None or (isinstance(row, str) and row in self.adapters):
                out.append(-1 if row is None else self.adapters.index(row))
            elif isinstance(row, int) and not isinstance(row, bool) and -1 <= row < len(self.adapters):
                out.append(row)
            else:
                what = "unknown adapter" if isinstance(row, str) else "adapter id"
                raise ValueError(f"{what} {row!r} is out of range for {self.path}: it stacks {self.adapters} (ids "
                                 f"0..{len(self.adapters) - 1}, or -1 / None for the base model)")
        return np.asarray(out, dtype=np.int64)

    def _ids(self, input_ids) -> tuple[np.ndarray, bool]:
        """input_ids -> int64 [B, S] and whether they came as torch; ids outside 0..vocab-1 are refused (the
        graph's Gather would read a row from the end for a negative id, where torch's embedding raises)."""
        ids, as_torch = _ids(input_ids)
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (self.vocab_size is not None and high >= self.vocab_size):
            bad = low if low < 0 else high
            limit = f"0..{self.vocab_size - 1}" if self.vocab_size is not None else "0 or more"
            raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary of {self.path} ({limit})")
        return ids, as_torch

    # ---- interface checks ---------------------------------------------------------------------------
    def _check_interface(self) -> None:
        missing = [n for n in REQUIRED_INPUTS if n not in self._inputs]
        if missing:
            raise ValueError(f"{self.path} lacks the input(s) {missing} that OnnxLM expects (it has "
                             f"{sorted(self._inputs)}); export it with amole_compile.export_onnx")
        if "logits" not in self._outputs:
            raise ValueError(f"{self.path} has no 'logits' output (it has {self._outputs})")
        layers: dict[int, set] = {}
        for name in self._inputs:
            if (m := _PAST.match(name)) is not None:
                layers.setdefault(int(m.group(1)), set()).add(m.group(2))
        want = [f"past_key_values.{i}.{t}" for i in range(len(layers)) for t in ("key", "value")]
        lacking = [n for n in want if n not in self._inputs]
        lacking += [n.replace("past_key_values", "present") for n in want
                    if n.replace("past_key_values", "present") not in self._outputs]
        if lacking:
            raise ValueError(f"{self.path} has a partial KV cache interface: missing {lacking}")

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length past tensors [B, H, 0, Dh] for the first (prefill) step."""
        feed = {}
        for name in self._past:
            info = self._inputs[name]
            heads, head_dim = info.shape[1], info.shape[3]
            if not isinstance(heads, int) or not isinstance(head_dim, int):
                raise ValueError(f"{self.path}: {name} must have static head and head_dim axes, got {info.shape}")
            feed[name] = np.zeros((batch, heads, 0, head_dim), dtype=_NP_TYPES.get(info.type, np.float32))
        return feed

    # ---- running ------------------------------------------------------------------------------------
    def _run(self, ids: np.ndarray, mask: np.ndarray, past: dict | None,
             rows: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        """One forward on `ids` (new tokens) with `mask` covering past + new -> (logits, present by past name)."""
        feed = {"input_ids": ids, "attention_mask": mask}
        if rows is not None:
            feed["adapter_ids"] = rows
        if self.uses_positions:
            feed["position_ids"] = positions(mask)[:, mask.shape[1] - ids.shape[1]:]
        if self.has_cache:
            feed.update(self._empty_past(ids.shape[0]) if past is None else past)
        out = self.session.run(["logits"] + self._present, feed)
        return out[0], dict(zip(self._past, out[1:], strict=True))

    def logits(self, input_ids, attention_mask=None, *, adapter_ids=None):
        """input_ids [B, S] (integers) -> logits [B, S, V]; attention_mask [B, S] defaults to all ones;
        adapter_ids: each row's adapter, for a graph exported with adapters=[...]."""
        ids, as_torch = self._ids(input_ids)
        mask = _mask(attention_mask, ids)
        return _like(self._run(ids, mask, None, self._adapter_ids(adapter_ids, ids.shape[0]))[0], as_torch)

    def generate(self, input_ids, max_new_tokens: int, eos_token_id=None, *, attention_mask=None,
                 pad_token_id: int | None = None, adapter_ids=None):
        """Greedy decoding -> [B, S + n] (prompt included), like HF `generate(do_sample=False)`.

        Rows that produced `eos_token_id` (an int or a list) are filled with `pad_token_id` (default: the
        first eos id) and decoding stops once every row has; left-padded prompts need `attention_mask`.
        adapter_ids: each row's adapter (name, index, or None / -1), for a graph exported with adapters=[...].
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        ids, as_torch = self._ids(input_ids)
        mask = _mask(attention_mask, ids)
        rows = self._adapter_ids(adapter_ids, ids.shape[0])
        eos = _eos_ids(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        done = np.zeros(ids.shape[0], dtype=bool)
        seq, new, past = ids, ids, None
        for _ in range(max_new_tokens):
            if self.has_cache:
                logits, past = self._run(new, mask, past, rows)
            else:
                logits, _ = self._run(seq, mask, None, rows)
            token = logits[:, -1].argmax(-1).astype(np.int64)
            token = np.where(done, pad, token)
            done |= np.isin(token, eos)
            new = token[:, None]
            seq = np.concatenate([seq, new], 1)
            mask = np.concatenate([mask, np.ones_like(new)], 1)
            if eos and done.all():
                break
        return _like(seq, as_torch)


# ---- input handling -----------------------------------------------------------------------------------

def positions(mask: np.ndarray) -> np.ndarray:
    """HF generate's position ids: cumsum(mask) - 1, padding positions at 1."""
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def _to_numpy(x):
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().numpy(), True
    return np.asarray(x), False


def _ids(input_ids) -> tuple[np.ndarray, bool]:
    arr, as_torch = _to_numpy(input_ids)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"input_ids must hold integer token ids, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"input_ids must have rank 2 [batch, sequence], got shape {tuple(arr.shape)}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"input_ids must hold at least one sequence of one token, got shape {tuple(arr.shape)}")
    return arr.astype(np.int64, copy=False), as_torch


def _mask(attention_mask, ids: np.ndarray) -> np.ndarray:
    if attention_mask is None:
        return np.ones_like(ids)
    mask, _ = _to_numpy(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
    return mask.astype(np.int64)


def _eos_ids(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])]


def _like(arr: np.ndarray, as_torch: bool):
    if as_torch:
        import torch

        return torch.from_numpy(np.ascontiguousarray(arr))
    return arr
