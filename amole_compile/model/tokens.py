"""Which tokens of a forward are real (not padding): what the expert statistics count.

The model-level forward pre-hook (`integrations/loss.pre_forward`) puts the forward's 2-D `attention_mask`
[B, S_all] (non-zero: a real token) in the call's context, and the forward hook takes it out again; a site whose
input is [B, S, D] (S <= S_all: the last S positions, as with a KV cache) then counts only the real tokens of
its batch, and one whose input is [S, B, D] (a seq-first model, as `passes/find_rows.py` found) too. Where the
model got no 2-D mask, or a site's input has another shape (flattened), every token counts. Forwards nest (a
model inside a model): the context is a stack.

Like the rows of a mixed batch (`mixed.py`), the value lives in a `contextvars.ContextVar` (thread- and
task-local), mirrored into a `threading.local` that torch.compile reads (dynamo cannot trace a ContextVar).

Legend: B rows, S tokens per row in this forward, S_all tokens per row the mask covers, T = B * S.
"""

from __future__ import annotations

import contextvars
import threading

import torch
from torch import Tensor

_STACK: contextvars.ContextVar[tuple[Tensor | None, ...]] = contextvars.ContextVar("amole_real_tokens",
                                                                                  default=())
_TRACE = threading.local()  # `.stack`: _STACK's value in this thread, for torch.compile


def _stack() -> tuple[Tensor | None, ...]:
    return getattr(_TRACE, "stack", ()) if torch.compiler.is_compiling() else _STACK.get()


def _set(stack: tuple[Tensor | None, ...]) -> None:
    if not torch.compiler.is_compiling():
        _STACK.set(stack)
    _TRACE.stack = stack


def enter(attention_mask) -> None:
    """A model forward begins with `attention_mask` (any value; only a 2-D tensor marks real tokens)."""
    mask = None
    if isinstance(attention_mask, Tensor) and attention_mask.dim() == 2:
        mask = attention_mask != 0  # [B, S_all] bool
    _set((*_stack(), mask))


def leave() -> None:
    """The model forward `enter` began has ended."""
    _set(_stack()[:-1])


def real_tokens(lead: tuple[int, ...] | torch.Size, rows: int = 0) -> Tensor | None:
    """[T] bool, True for the real tokens of a site input whose leading shape is `lead`: (B, S) with `rows` 0,
    (S, B) with `rows` 1 (a seq-first input; `passes/find_rows.py` found which); None when every token counts
    (no 2-D mask in this forward, or a shape it does not describe)."""
    stack = _stack()
    mask = stack[-1] if stack else None
    if mask is None or len(lead) != 2 or rows not in (0, 1):
        return None
    b, s = (lead[1], lead[0]) if rows else lead
    if mask.shape[0] != b or s > mask.shape[1]:
        return None
    real = mask[:, mask.shape[1] - s:]  # [B, S]: the last S positions of each row
    return (real.t() if rows else real).reshape(-1)  # in the input's order
