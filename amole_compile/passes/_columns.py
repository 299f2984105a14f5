"""Which output columns of a (possibly fused) projection feed one attention role.

Replays the shape-only ops between the projection and the role's first arithmetic op on an index tensor
`arange(d_out)` broadcast to the projection's output shape (docs/discovery.md). The indices that reach the role's
cone are its columns: contiguous thirds for GPT-2 / Phi-3, per-head strided sets for GPT-NeoX / Bloom.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ._fx import CAST_OPS, SHAPE_OPS, meta_value, op_name


class ColumnsUnknown(Exception):
    """The projection's output shape or a shape op's arguments are not known (no example values)."""


def _replay(node: fx.Node, env: dict[fx.Node, object]) -> object:
    """Run a shape-only node on the index tensors in env (other node args take their example values)."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n] if n in env else meta_value(n))
    name = op_name(node)
    if name in CAST_OPS:
        return args[0]
    if node.op == "call_method":
        return getattr(args[0], "reshape" if name == "view" else name)(*args[1:], **kwargs)
    if node.target is operator.getitem:
        return args[0][args[1]]
    if name in ("view", "_unsafe_view"):  # views of expanded index tensors need copies
        return torch.reshape(args[0], args[1])
    return node.target(*args, **kwargs)


def _replayable(node: fx.Node, src: fx.Node, env: dict[fx.Node, object]) -> bool:
    """A shape op whose only tensor input is an index tensor we hold."""
    if op_name(node) not in SHAPE_OPS | CAST_OPS or node.op not in ("call_function", "call_method"):
        return False
    inputs = [a for a in node.all_input_nodes if isinstance(meta_value(a), torch.Tensor) or a in env]
    return inputs == [src]


def role_columns(linear: fx.Node, out_features: int, cone: set[fx.Node]) -> set[int]:
    """Columns of `linear` whose values reach the role: follow shape ops inside `cone` (the nodes between the
    projection and the role's attention input, that input included); collect indices where they stop."""
    val = meta_value(linear)
    if not isinstance(val, torch.Tensor) or val.shape[-1] != out_features:
        raise ColumnsUnknown(f"no example shape for {linear.name}")
    idx = torch.arange(out_features).expand(tuple(int(s) for s in val.shape))
    env: dict[fx.Node, object] = {linear: idx}
    seen = torch.zeros(out_features, dtype=torch.bool)
    stack = [linear]
    while stack:
        n = stack.pop()
        for user in n.users:
            if user not in cone:
                continue
            if _replayable(user, n, env):
                try:
                    env[user] = _replay(user, env)
                except Exception as exc:  # a shape op we cannot replay: be explicit rather than guess
                    raise ColumnsUnknown(f"cannot replay {user.name} ({op_name(user)}): {exc}") from exc
                stack.append(user)
            else:
                seen[torch.as_tensor(env[n]).reshape(-1)] = True
    return set(seen.nonzero().flatten().tolist())
