"""Find pass: which dimension of each adapted projection's input holds the rows of the model's batch, so that in
a mixed batch (`batch_adapters`, the ONNX export's `adapter_ids`) each row gets its own adapter.

Pattern:        every adapted projection (`model/state.projections`) and the example inputs discovery used; the
                batch is dimension 0 of the model's inputs (the rows `batch_adapters` names).
Replacement:    none. Three forwards in eval mode without gradients (`capture.probe_forward`), with every
                holder's `add_to` / `add_role` shadowed by a marker (`check_calls.marked`) that records its input
                and returns the projection's output unchanged: of the first row of each batched input, of the
                second row, and of both (the first twice where there is one row). An input whose size differs
                between the two rows depends on their values (an MoE's experts get the tokens routed to them):
                no dimension holds the rows. Else the dimension of x [..., D] that grows
                from 1 to 2 is the batch (`[B, S, D]`, a seq-first `[S, B, D]`, ...). A dimension that grows
                from c to 2c holds the rows flattened with c tokens each: row-major (`[B * S, D]`, the row's c
                tokens together) is the batch's dimension, as each row's tokens are contiguous; token-major
                (`[S * B, D]`, the rows interleaved) is not one. Which of the two the values tell: the one-row
                run's x must equal the two-row run's first row read that way, and not the other way.
                A deep model's identical blocks run once per forward (`_repeats_skipped`: a block called like an
                earlier one returns that block's output), and their projections take the layout of the same
                projection in the block that ran, as discovery replays one block's capture on the blocks like
                it: 0.13 s instead of ~1.2 s a forward for the Llama-2-7B shape on the meta device.
Preconditions:  the rows of the batch are computed independently (eval mode: no batch statistics).
Invariants:     the model's parameters, buffers and flags are as before; each holder gets `batch_dim`, a
                `BatchDim` with the dimension, or None and the reason (a mixed batch then raises it: it never
                guesses). Where no inputs can be had or a forward fails, every holder gets None and why.
Why:            a projection need not see its batch in dimension 0: a seq-first model (nn.Transformer's
                default layout) feeds [S, B, D]. Taking dimension 0 for the batch there gave rows the wrong
                adapters, silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from ..model.mixed import BatchDim
from ..model.projection import ProjectionAdapters
from ..model.state import projections
from .capture import (
    CaptureError,
    block_signature,
    example_args,
    find_blocks,
    probe_forward,
    unwrap_forwards,
    wrap_forward,
)
from .check_calls import marked

TOL = {torch.float32: 1e-3, torch.float64: 1e-6}  # relative to the larger |x|; any other dtype (bf16, fp16): 5e-2
LOW_TOL = 5e-2


@dataclasses.dataclass
class RowsReport:
    """What the pass found: per projection, its `BatchDim`."""

    found: dict[str, BatchDim] = dataclasses.field(default_factory=dict)

    @property
    def matched(self) -> int:
        """Projections whose batch dimension was found."""
        return sum(b.dim is not None for b in self.found.values())

    def summary(self) -> str:
        """One line: how many projections' batch dimension was found."""
        return f"find_rows: the batch dimension of {self.matched} of {len(self.found)} projection(s) found"


def find_rows(model: nn.Module, example_inputs=None) -> RowsReport:
    """Set `batch_dim` on every adapted projection of `model` not found by an earlier call (see the module
    doc) -> the report (of those)."""
    every = dict(projections(model))  # all marked in each run: no adapter computes, whichever is active
    holders = {n: h for n, h in every.items() if h.batch_dim is None or h.batch_dim.dim is None}
    report = RowsReport()
    if not holders:
        return report
    try:
        found = _layouts(holders, every, *_three_runs(model, every, example_inputs))
    except Exception as exc:  # the forward failed, or no inputs: nothing can be told
        found = _synthesised_instead(model, holders, every, example_inputs, exc)
    for name, holder in holders.items():
        holder.batch_dim = report.found[name] = found[name]._replace(name=name)
    return report


def _three_runs(model: nn.Module, every: dict[str, ProjectionAdapters], example_inputs) -> tuple[tuple, dict]:
    """The forwards of the first row, the second, and both (see the module doc) -> (their records, the copied
    blocks)."""
    runs, batch = _row_inputs(model, example_inputs)
    with _repeats_skipped(model) as copies:  # (the same blocks skipped in each run: their values agree)
        one = _run(model, every, runs[0], "")
        # the second row alone tells sizes set by values; shapes-only forwards cannot run such ops at all
        other = _run(model, every, runs[1], one[2]) if batch > 1 and one[1] else one
        two = _run(model, every, runs[2], one[2])
    return (one, other, two), copies


def _synthesised_instead(model: nn.Module, holders: dict[str, ProjectionAdapters],
                         every: dict[str, ProjectionAdapters], example_inputs, exc: Exception) -> dict[str, BatchDim]:
    """After the given example inputs' forwards failed (`exc`): the rows from synthesised ones where the model can
    make them (a Hugging Face model). Qwen2-VL's images are one tensor of every image's patches: cut to one row,
    the inputs disagreed, and no projection's rows could be told, the language model's included. Projections
    those inputs do not reach (its vision tower) say so. Else every holder gets None and why."""
    if example_inputs is not None:
        try:
            return _layouts(holders, every, *_three_runs(model, every, None))
        except Exception:  # (the given inputs' failure is the one to name)
            pass
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return dict.fromkeys(holders, BatchDim(None, 0, f"no forward of example inputs could show it ({first})"))


def _layouts(holders: dict[str, ProjectionAdapters], every: dict[str, ProjectionAdapters], runs: tuple,
             copies: dict[str, str]) -> dict[str, BatchDim]:
    """Each of `holders`' layout from the runs' recordings (one row, the other row, both); one in a skipped block
    takes that of the same projection in the block that ran (`_copied`)."""
    one, other, two = runs
    own = {n: _layout(one[0].get(n, []), other[0].get(n, []), two[0].get(n, []), one[1] and two[1])
           for n in holders if _copied(n, copies) is None}
    out = {}
    for name in holders:
        like = _copied(name, copies)
        out[name] = own[name] if like is None else own.get(like) or every[like].batch_dim or \
            BatchDim(None, 0, f"its block ran as {like}'s, whose layout is not known")
    return out


def _copied(name: str, copies: dict[str, str]) -> str | None:
    """The projection, in the block that ran, whose layout projection `name` shares: its block returned that
    block's output unrun (`_repeats_skipped`); None where its own block ran."""
    for block, like in copies.items():
        if name.startswith(block + "."):
            return like + name[len(block):]
    return None


@contextlib.contextmanager
def _repeats_skipped(model: nn.Module) -> Iterator[dict[str, str]]:
    """Within: a block (`capture.find_blocks`) called like another block before it (the same class, parameter
    and input shapes: `capture.block_signature`) returns that block's output without running: the identical
    layers of a deep model run once (as discovery captures them once). Yields {skipped block: the block that ran}."""
    copies: dict[str, str] = {}
    ran: dict[tuple, tuple[str, object]] = {}
    saved = []
    for name, block in find_blocks(model):
        def forward(*a, _name=name, _block=block, _orig=block.forward, **kw):
            key = block_signature(_block, a, kw)
            if key in ran and ran[key][0] != _name:  # (a block called again, ALBERT's shared layer, runs)
                copies[_name] = ran[key][0]
                return ran[key][1]
            out = _orig(*a, **kw)
            ran.setdefault(key, (_name, out))
            return out
        saved.append(wrap_forward(block, forward))
    try:
        yield copies
    finally:
        unwrap_forwards(saved)


def _row_inputs(model: nn.Module, example_inputs) -> tuple[tuple[tuple, tuple, tuple], int]:
    """The example inputs with their first row, their second row (the first if they have one), and both: every
    tensor whose dimension 0 is the batch (that of the first tensor input) is cut to those rows; and the
    batch."""
    args, kwargs = example_args(model, example_inputs)
    leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor) and t.dim() > 0]
    if not leaves:
        raise CaptureError("the example inputs hold no tensor with a batch dimension")
    batch = leaves[0].shape[0]
    picks = [[0], [min(1, batch - 1)], [0, min(1, batch - 1)]]

    def rows(pick: list[int]):
        def cut(t: object) -> object:
            if not isinstance(t, Tensor) or t.dim() == 0 or t.shape[0] != batch:
                return t
            return t[pick[0]:pick[0] + 1] if len(pick) == 1 else t[pick]
        return tree_map(cut, (args, kwargs))
    return tuple(rows(p) for p in picks), batch


def _run(model: nn.Module, holders: dict[str, ProjectionAdapters], inputs,
         prefer: str) -> tuple[dict[str, list[Tensor]], bool, str]:
    """One forward (tried `prefer`'s way first: "real", "fake" or "" as `probe_forward` picks) -> each holder's
    inputs, call by call, whether they hold values (not fake, not meta), and how it ran."""
    seen: dict[str, list[Tensor]] = {}
    with marked(holders, lambda name, x, _y: seen.setdefault(name, []).append(x.detach())):
        how = probe_forward(model, *inputs, prefer=prefer)
    return seen, _real(how, seen), how


def _real(how: str, seen: dict[str, list[Tensor]]) -> bool:
    """Do the recorded inputs hold values (a real forward, not on the meta device)?"""
    return how == "real" and all(x.device.type != "meta" for xs in seen.values() for x in xs)


def _layout(ones: list[Tensor], others: list[Tensor], twos: list[Tensor], real: bool) -> BatchDim:
    """The batch dimension of a projection from its inputs, call by call, with the first row (`ones`), the
    second row (`others`) and both (`twos`)."""
    if not ones or len(ones) != len(twos):
        return BatchDim(None, 0, f"it ran {len(ones)} time(s) in a forward of one row and {len(twos)} in one of "
                                 "two rows")
    if [x.shape for x in ones] != [x.shape for x in others]:
        return BatchDim(None, ones[0].dim(), "its input's size depends on the row's values (tokens dispatched by "
                                             "value, as to an MoE's experts), so no dimension holds the rows")
    found = {_call_layout(x1, x2, real) for x1, x2 in zip(ones, twos, strict=True)}
    dims = {f for f in found if isinstance(f, int)}
    if len(found) == 1 and dims:
        return BatchDim(dims.pop(), ones[0].dim(), "")
    whys = sorted(f for f in found if isinstance(f, str))
    why = whys[0] if whys else f"its calls hold the batch in different dimensions ({sorted(dims)})"
    if whys and dims:  # (DeBERTa's query_proj also projects the relative positions, which every row shares)
        why = (f"of its {len(ones)} calls in a forward, some hold the batch in dimension {sorted(dims)[0]} and "
               f"another does not: {why}")
    return BatchDim(None, ones[0].dim(), why)


def _call_layout(x1: Tensor, x2: Tensor, real: bool) -> int | str:
    """One call's input with one row (x1) and with two (x2) -> the batch's dimension, or why there is none."""
    shapes = f"its input is {tuple(x1.shape)} for one row and {tuple(x2.shape)} for two"
    if x1.dim() != x2.dim():
        return shapes
    grew = [k for k in range(x1.dim() - 1) if x1.shape[k] != x2.shape[k]]
    if not grew:
        return f"its input does not grow with the batch ({shapes}): the rows share it"
    k = grew[0]
    if len(grew) > 1 or x2.shape[k] != 2 * x1.shape[k]:
        return f"{shapes}: no one dimension holds the rows"
    c = x1.shape[k]  # the tokens of one row in dimension k
    if not real:
        return k if c == 1 else f"{shapes}, rows flattened with other dimensions; only a forward on real values " \
                                "can tell how (the example forward ran on fake tensors or the meta device)"
    first = x2.unflatten(k, (2, c)).select(k, 0)  # row 0, if the rows are row-major in dimension k
    interleaved = x2.unflatten(k, (c, 2)).select(k + 1, 0)  # row 0, if they are token-major
    major, minor = _same(first, x1), c > 1 and _same(interleaved, x1)
    if major and not minor:
        return k
    if minor and not major:
        return (f"{shapes}: dimension {k} holds the rows interleaved, token by token (a flattened "
                "[tokens x batch]), so no dimension holds a row's tokens together")
    if major:
        return f"{shapes}: the rows' tokens are all alike, so it cannot be told how the rows are flattened"
    return f"{shapes}: the first row's input changes when a second row is added (rows not computed independently)"


def _same(a: Tensor, b: Tensor) -> bool:
    """a == b up to the rounding of their dtype (a two-row matmul may round otherwise than a one-row one)."""
    if a.shape != b.shape:
        return False
    tol = TOL.get(b.dtype, LOW_TOL)
    a, b = a.double(), b.double()
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-12)
    return (a - b).abs().max().item() <= tol * scale
