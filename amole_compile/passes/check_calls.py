"""Check pass: after the swap, the adapters of every adapted projection must run in a forward of the model, in
eval mode and in training mode.

Pattern:        the projections a rewrite adapted (canonical names, `model/state.projections`) and the example
                inputs discovery used (the caller's `example_inputs`, or a HF model's synthesised ones).
Replacement:    none. Two forwards without gradients (`capture.probe_forward`: for real where that is cheap,
                else on fake tensors: shapes only) record which projections' adapters were applied (each
                holder's `add_to` / `add_role`, shadowed for the call by a marker that returns the projection's
                output unchanged: nothing is computed, counted or recorded):
                - in eval mode: every adapted projection must run;
                - in training mode (buffers and random generators restored after): a projection whose weight
                  its parent read (the holder's `weight`) must run too. A parent may use the weight directly in
                  training only (Gemma3n's AltUp clamps its correction coefficients' weight): the adapter would
                  change the eval output and never train. A projection neither called nor read there (a layer
                  dropped at random, LayerDrop) is not reported.
                Nothing stays on the model.
Why:            discovery reads the graph a capture traced in eval mode; at run time a parent may still read a
                projection's weight directly, a fast path or a flag may skip a module's forward. An adapter there
                would never run: its output equals the base, it gets no gradient, and nothing would say so.
Invariants:     the model's parameters, buffers, random generators and train / eval flags are as before; returns
                the projections whose adapters did not run (with the mode), or None (with a warning) when no
                inputs can be had or the eval forward fails, so that the adapters could not be checked.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator

from torch import Tensor, nn

from ..model.projection import ProjectionAdapters
from ..model.state import projections
from .capture import CaptureError, _first_line, example_args, probe_forward
from .reach import DeadAdapterError
from .swap_modules import UnsupportedLayerError


@contextlib.contextmanager
def marked(holders: dict[str, ProjectionAdapters], note: Callable[[str, Tensor, object], object]) -> Iterator[None]:
    """For the block, each holder's `add_to` / `add_role` calls `note(its name, x, y)` and returns y unchanged."""
    for name, holder in holders.items():
        holder.__dict__["add_to"] = lambda x, y, _n=name: (note(_n, x, y), y)[1]
        holder.__dict__["add_role"] = lambda role, x, y, _n=name: (note(_n, x, y), y)[1]
    try:
        yield
    finally:
        for holder in holders.values():
            holder.__dict__.pop("add_to", None)
            holder.__dict__.pop("add_role", None)


@contextlib.contextmanager
def weight_reads(holders: dict[str, ProjectionAdapters], note: Callable[[str], object]) -> Iterator[None]:
    """For the block, reading the `weight` property of one of `holders` (a parent using the projection's weight
    itself) calls `note(its name)`; the value read is unchanged. The property is swapped on the holders'
    classes, so reads of other models' holders (other threads) are not noted."""
    names = {id(h): n for n, h in holders.items()}
    swapped = []
    for cls in {type(h) for h in holders.values()}:
        prop = inspect.getattr_static(cls, "weight", None)
        if not isinstance(prop, property):
            continue

        def read(self, _get=prop.fget):
            name = names.get(id(self))
            if name is not None:
                note(name)
            return _get(self)

        swapped.append((cls, "weight" in cls.__dict__, prop))
        cls.weight = property(read, doc=prop.__doc__)
    try:
        yield
    finally:
        for cls, own, prop in swapped:
            if own:
                cls.weight = prop
            else:
                del cls.weight


def adapters_not_run(model: nn.Module, modules: list[str], example_inputs=None,
                     calls: list | None = None) -> list[str] | None:
    """The projections among `modules` (canonical names) whose adapters did not run in one eval-mode forward of
    the example inputs, then those whose weight a training-mode forward read without running them (named
    "<name> (in training mode)"); None: they could not be checked, and a warning says why. `calls`: a list that
    gets each adapted projection's calls in the eval-mode forward, (name, the tensor it was called on), in order
    (`find_siblings.link_siblings`)."""
    every = dict(projections(model))
    holders = {n: h for n, h in every.items() if n in set(modules)}
    if not holders:
        return []
    try:
        args, kwargs = example_args(model, example_inputs)
    except CaptureError as exc:
        warnings.warn(f"amole_compile could not check that the adapters of {type(model).__name__} run (a forward "
                      f"of example inputs would show it): {exc}", stacklevel=4)
        return None
    ran = _ran(model, every if calls is not None else holders, args, kwargs, training=False, calls=calls)
    if ran is None:
        return None
    dead = [n for n in holders if n not in ran]
    read: set[str] = set()
    with weight_reads(holders, read.add):
        ran_training = _ran(model, holders, args, kwargs, training=True)
    if ran_training is not None:
        dead += [f"{n} (in training mode)" for n in holders if n in read and n not in ran_training and n in ran]
    return dead


def _ran(model: nn.Module, holders: dict[str, ProjectionAdapters], args: tuple, kwargs: dict,
         training: bool, calls: list | None = None) -> set[str] | None:
    """The holders whose adapters ran in one forward (None, with a warning, when the forward failed); `calls` (a
    list) gets (name, x) for each call."""
    ran: set[str] = set()
    not_tensors: dict[str, str] = {}

    def note(name: str, x: Tensor, y: object) -> None:
        ran.add(name)
        if not isinstance(y, Tensor):
            not_tensors.setdefault(name, type(y).__name__)
        if calls is not None:
            calls.append((name, x))

    try:
        with marked(holders, note):
            probe_forward(model, args, kwargs, training=training)
    except Exception as exc:
        if calls is not None:
            calls.clear()  # a forward cut short tells no sibling sets
        mode = "a training-mode" if training else "a"
        warnings.warn(f"amole_compile could not check that the adapters of {type(model).__name__} run: {mode} "
                      f"forward of the example inputs failed ({_first_line(exc)})", stacklevel=5)
        return None
    if not_tensors:
        name, kind = next(iter(not_tensors.items()))
        raise UnsupportedLayerError(
            f"cannot adapt {name}: its forward returns a {kind}, not a tensor (an adapter adds its delta to the "
            f"projection's output; {len(not_tensors)} such projection(s)). Leave it out with "
            "AdaMoLEConfig(exclude=...); nothing was changed")
    return ran


def check_adapters_run(model: nn.Module, modules: list[str], example_inputs=None, calls: list | None = None) -> None:
    """Raise `DeadAdapterError` naming each projection among `modules` whose adapters did not run; `calls` as
    `adapters_not_run`'s."""
    dead = adapters_not_run(model, modules, example_inputs, calls)
    if not dead:
        return
    listed = "\n".join(f"  {n}" for n in dead)
    given = "the example inputs given" if example_inputs is not None else "its synthesised example inputs"
    raise DeadAdapterError(
        f"{type(model).__name__}: the adapters of {len(dead)} projection(s) did not run in a forward of {given}, so "
        f"they would never change the output or get a gradient (those marked 'in training mode' would change the "
        f"eval output and never train):\n{listed}\nThe model computes without calling their forward: a parent may "
        "read the weight directly (as F.multi_head_attention_forward does; some parents only in training mode), or "
        "a fast path or a flag skips the module. Leave them out with AdaMoLEConfig(exclude=...), or pass "
        "example_inputs that use them; nothing was changed")
