"""Find pass: adapted projections that read the same input in a forward (an attention block's separate q, k and v
projections), linked so that the first one called computes all of them in one op (issue 21: one launch for q, k
and v, which share x).

Pattern:        the calls of every adapted projection in one eval-mode forward of the example inputs (the check
                pass's, `check_calls.adapters_not_run`), each with the tensor it was called on. Projections called
                one after another on one tensor object (no other adapted projection called between them) are
                siblings when each of them is an `AdaMoLELinear` called once in that run, and every call of each
                of them was in such a run with exactly the same projections (a shared layer called per block, as
                ALBERT's, still qualifies; a projection called on its own anywhere does not).
                Consecutive, not merely on the same tensor: every decoder layer's cross-attention reads the
                encoder's output, and one set across layers would draw later layers' dropout masks in the first
                layer's forward, which activation checkpointing's per-layer recompute could not reproduce.
Replacement:    none in the graph: each sibling gets `_siblings`, the tuple of its set in call order (the order
                their dropout masks are drawn in); projections not in a set lose it.
Preconditions:  the forward ran (a forward that fails links nothing).
Invariants:     numbers are the same linked or not. At run time the first sibling called folds those of its
                siblings that would fold on their own (`AdaMoLELinear.folding_group`; the others run alone), and a
                sibling takes the held result only for the same x object at the same version, gradient mode, active
                adapter and training mode (`model.folding.Held`); anything else computes afresh. A call order that
                differs at run time costs only the held work.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..model.projection import AdaMoLELinear
from ..model.state import projections


def link_siblings(model: nn.Module, calls: Sequence[tuple[str, Tensor]]) -> list[tuple[str, ...]]:
    """Link the sibling sets found in `calls` ((projection name, the tensor it was called on), in call order,
    the tensors alive) on `model`'s holders: runs of consecutive calls on one tensor (see the module doc) -> the
    sets, by name."""
    holders = dict(projections(model))
    runs: list[list[str]] = []  # consecutive calls on one tensor
    last = None
    for name, x in calls:
        if x is last:
            runs[-1].append(name)
        else:
            runs.append([name])
        last = x
    seen: dict[str, set[tuple[str, ...]]] = {}  # projection -> the runs of names it was called in
    for names in runs:
        for name in names:
            seen.setdefault(name, set()).add(tuple(names))
    sets = {next(iter(s)) for s in seen.values() if len(s) == 1}
    linked = [names for names in sorted(sets) if _qualifies(names, holders, seen)]
    for holder in holders.values():
        holder.__dict__.pop("_siblings", None)
    for names in linked:
        group = tuple(holders[n] for n in names)
        for holder in group:
            holder.__dict__["_siblings"] = group
    return linked


def _qualifies(names: tuple[str, ...], holders: dict, seen: dict) -> bool:
    """Two or more distinct `AdaMoLELinear`s, each called once per input, every call of each with this set."""
    return (len(names) > 1 and len(set(names)) == len(names)
            and all(type(holders.get(n)) is AdaMoLELinear and seen[n] == {names} for n in names))
