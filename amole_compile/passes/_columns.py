"""Which output columns of a (possibly fused) projection reach one attention role: index replay.

The nodes between the projection and the role's input (the cone) are run, in graph order, on index tensors:
the projection's output is `arange(d_out)` broadcast to its shape, every other tensor is filled with `NONE`
(no column of this projection). Each op is handled by what it does to positions, not by its name:

- pointwise ops (`torch.Tag.pointwise`: rotary's mul/add, clamps, scaling, gating) keep each position's
  column: their output is the broadcast of their index inputs (several distinct ones are kept side by side);
- casts and dropout are the identity; buffer constructors (`new_empty`, `zeros`, ...) give `NONE` buffers;
- any other op (view, transpose, split, getitem, cat, slice, repeat_kv's expand, in-place `copy_` into a
  slice of a buffer, ...) is run for real on the int64 index tensors; its result is kept when every value it
  holds was an input value (a permutation or selection), and otherwise (a reduction, a matmul, a norm:
  arithmetic mixing) the replay stops there and every column that reached the op counts for the role.

The indices that reach the role's input are its columns: contiguous thirds for GPT-2 / Phi-3, per-head
strided sets for GPT-NeoX / Bloom, MLA's k-nope and v columns of `kv_b_proj` (docs/discovery.md).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ._fx import META_ARGS, concrete_shape, is_view, meta_value, op_name

NONE = -1  # "no column of this projection"
MAX_ALTERNATIVES = 4  # distinct index tensors kept side by side for one node (rotary keeps 2)
IDENTITY_OPS = frozenset({"to", "_to_copy", "type_as", "float", "half", "bfloat16", "double", "type", "dropout",
                          "feature_dropout", "alpha_dropout", "detach", "clone", "contiguous", "alias",
                          "lift_fresh_copy", "_assert_tensor_metadata"})
# Ops known to only move elements (views are recognised by their schema): their results need no value check.
MOVES = frozenset({"getitem", "cat", "concat", "stack", "split", "split_with_sizes", "chunk", "unbind", "clone",
                   "contiguous", "repeat", "repeat_interleave", "copy_", "index_select", "flip", "roll", "reshape",
                   "flatten", "unflatten", "tile"})
CONSTRUCTORS = frozenset({"new_empty", "new_zeros", "new_ones", "new_full", "new_empty_strided", "empty_like",
                          "zeros_like", "ones_like", "full_like", "empty", "zeros", "ones", "full"})


class ColumnsUnknown(Exception):
    """The projection's output shape is not known (no example values)."""


def _shape(node: object) -> tuple[int, ...] | None:
    return concrete_shape(meta_value(node))


class _Unknown(Exception):
    """An integer tensor outside the path whose value we do not have (it may be an index)."""


def _fill(node: object, constant) -> object:
    """A node outside the index env: its literal, a constant's real value, or a NONE tensor of its shape."""
    val = meta_value(node)
    if isinstance(node, fx.Node) and (real := constant(node)) is not None:
        return real.detach().cpu()
    if isinstance(val, torch.Tensor):
        if not val.dtype.is_floating_point and not val.dtype.is_complex:
            raise _Unknown(node.name)
        return torch.full(_known_shape(node, val), NONE, dtype=torch.long)
    if isinstance(val, (list, tuple)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return type(val)(torch.full(_known_shape(node, v), NONE, dtype=torch.long) for v in val)
    if isinstance(val, torch.SymInt):  # a size that depends on values
        raise _Unknown(node.name)
    return val


def _known_shape(node: object, val: torch.Tensor) -> tuple[int, ...]:
    shape = concrete_shape(val)
    if shape is None:  # a size that depends on values
        raise _Unknown(getattr(node, "name", str(node)))
    return shape


def _is_pointwise(node: fx.Node) -> bool:
    tags = getattr(node.target, "tags", ()) if node.op == "call_function" else ()
    if torch.Tag.pointwise in tags:
        return True
    return node.op == "call_method" and op_name(node) in {"add", "sub", "mul", "div", "neg", "clamp", "clamp_",
                                                           "sigmoid", "tanh", "pow", "sqrt", "rsqrt", "exp"}


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class _Replay:
    def __init__(self, out_features: int, constant) -> None:
        self._constant = constant
        self.out_features = out_features
        self.env: dict[fx.Node, list[object]] = {}
        self.reached = torch.zeros(out_features, dtype=torch.bool)

    def constant(self, node: fx.Node) -> torch.Tensor | None:
        """A constant's real value, through copies and casts (`lift_fresh_copy` of Falcon's `[-2]` index)."""
        real = self._constant(node)
        if real is None and op_name(node) in IDENTITY_OPS and node.args and isinstance(node.args[0], fx.Node):
            return self.constant(node.args[0])
        return real

    def collect(self, values: list[object]) -> None:
        for t in (t for v in values for t in _tensors(v)):
            flat = t.reshape(-1)
            self.reached[flat[flat >= 0]] = True

    def run(self, node: fx.Node) -> None:
        env = self.env
        ins = [a for a in node.all_input_nodes if a in env]
        name = op_name(node)
        if name in CONSTRUCTORS:
            shape = _shape(node)
            if shape is not None:
                env[node] = [torch.full(shape, NONE, dtype=torch.long)]
            return
        if not ins:
            return
        meta_only = META_ARGS.get(name, set())
        data_ins = [a for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a in env and i not in meta_only]
        if name in IDENTITY_OPS:
            if data_ins:
                env[node] = env[data_ins[0]]
            return
        if _is_pointwise(node) and _shape(node) is not None:
            self._pointwise(node, ins)
            return
        try:
            self._exact(node, ins)
        except Exception:  # an op we cannot run on indices mixes them, for all we know
            self.collect([v for a in ins for v in env[a]])

    def _pointwise(self, node: fx.Node, ins: list[fx.Node]) -> None:
        shape, out = _shape(node), []
        if node.args and isinstance(node.args[0], fx.Node) and node.args[0] in self.env and op_name(node).endswith("_"):
            self.env[node] = self.env[node.args[0]]  # in place (clamp_): the buffer keeps its columns
            return
        for a in ins:
            for t in self.env[a]:
                if not isinstance(t, torch.Tensor):
                    continue
                try:
                    b = torch.broadcast_to(t, shape)
                except RuntimeError:
                    continue
                if not any(torch.equal(b, o) for o in out):
                    out.append(b)
        if len(out) > MAX_ALTERNATIVES:
            self.collect(out)
        elif out:
            self.env[node] = out

    def _exact(self, node: fx.Node, ins: list[fx.Node]) -> None:
        env = self.env
        multi = [a for a in ins if len(env[a]) > 1]
        if len(multi) > 1 or (multi and len(ins) > 1):
            raise ValueError("several alternative index tensors meet")
        alts = env[multi[0]] if multi else [None]
        results = []
        for alt in alts:
            def value(n: fx.Node, alt=alt) -> object:
                if n in env:
                    return alt if (multi and n is multi[0]) else env[n][0]
                return _fill(n, self.constant)

            args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
            if node.op == "call_method":
                out = getattr(args[0], op_name(node))(*args[1:], **kwargs)
            elif node.target is operator.getitem:
                out = args[0][args[1]]
            else:
                out = node.target(*args, **kwargs)
            got = _tensors(out)
            if not got or any(t.dtype != torch.long for t in got):
                raise ValueError("not a selection")
            if is_view(node) or op_name(node) in MOVES:  # they cannot mix values: no need to check
                results.append(out)
                continue
            allowed = torch.zeros(self.out_features + 1, dtype=torch.bool)  # allowed[c + 1]: c may appear
            allowed[0] = True  # NONE
            for a in ins:
                for t in (t for v in ([alt] if multi and a is multi[0] else env[a]) for t in _tensors(v)):
                    allowed[t.reshape(-1) + 1] = True
            for t in got:
                flat = t.reshape(-1)
                if flat.numel() and (int(flat.min()) < NONE or int(flat.max()) >= self.out_features
                                     or not bool(allowed[flat + 1].all())):
                    raise ValueError("values mixed")
            results.append(out)
        env[node] = results


def role_columns(linear: fx.Node, out_features: int, cone: set[fx.Node], role_input: fx.Node,
                 order: dict[fx.Node, int], constant=lambda n: None) -> set[int]:
    """Columns of `linear` whose values reach `role_input`, replaying the nodes of `cone` (the data ancestors
    of the role's input down to the projection) in graph order."""
    shape = _shape(linear)
    if shape is None or shape[-1] != out_features:
        raise ColumnsUnknown(f"no example shape for {linear.name}")
    replay = _Replay(out_features, constant)
    replay.env[linear] = [torch.arange(out_features).expand(shape)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: threads cost more than they save (6x on a busy 2-core machine)
    try:
        for node in sorted(cone, key=order.__getitem__):
            if node is not linear and node.op in ("call_function", "call_method") and order[node] > order[linear]:
                replay.run(node)
        if role_input in replay.env:
            replay.collect(replay.env[role_input])
    finally:
        torch.set_num_threads(threads)
    return set(replay.reached.nonzero().flatten().tolist())
