"""Run the ops between some projections and a tensor on chosen values, to learn what the ops compute from how
their outputs respond, not from their names: is the result an elementwise function of the projections (each
output element moves with at most one input element), and is it affine in a given set of a projection's
columns (an up projection) or not (the gate side of a product, an activation)?

The nodes are those on data paths from the projections to the tensor (`DataFlow`); every other input keeps
one value for all runs: literals and constants as they are, float tensors a fixed random fill of their example
shape. The runs are on the CPU in float32 on small example shapes (a model on the meta device included).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ._fx import concrete_shape, meta_value, walk

AFFINE_TOL = 1e-2  # relative deviation below which a response counts as affine (bf16 casts on the way stay below)
SCALE = 2.0  # inputs ~ N(0, SCALE²): activations are far from affine at this scale
BUMPS = 6  # elements moved one at a time by the elementwise test


class ProbeFailed(Exception):
    """An op on the path could not be run on probe values (an integer input we have no value for, ...).
    `sized_by_values`: because a size on the path depends on values (rows picked by a mask, an MoE's routed
    tokens), not because of what the ops compute."""

    def __init__(self, message: str, sized_by_values: bool = False) -> None:
        super().__init__(message)
        self.sized_by_values = sized_by_values


def _cpu(value: object) -> object:
    if isinstance(value, torch.device):
        return torch.device("cpu")
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return value


def _shape(node: fx.Node, val: torch.Tensor) -> tuple[int, ...]:
    """The example shape of `node`; ProbeFailed where a size depends on values (an MoE's routed tokens: the
    capture left it symbolic)."""
    shape = concrete_shape(val)
    if shape is None:
        raise ProbeFailed(f"{node.name} has a size that depends on values: {tuple(val.shape)}", True)
    return shape


class Probe:
    """`f(sources) -> target`: the ops between the projection nodes `sources` and `target`, runnable."""

    def __init__(self, g, sources: list[fx.Node], target: fx.Node) -> None:
        is_src = set(sources).__contains__
        _, back = walk(target, g.flow.inputs, is_src)
        forward: set[fx.Node] = set()
        for s in sources:
            forward |= walk(s, g.users, lambda n: False)[1]
        self.nodes = sorted((back & forward) - set(sources), key=g.flow.order.__getitem__)
        self.sources, self.target, self.constant = sources, target, g.params.constant
        self._fills: dict[fx.Node, object] = {}
        self._gen = torch.Generator().manual_seed(0)

    def random(self, source: fx.Node) -> torch.Tensor:
        return torch.randn(_shape(source, meta_value(source)), generator=self._gen) * SCALE

    def _fill(self, node: fx.Node) -> object:
        if node not in self._fills:
            real = self.constant(node)
            val = meta_value(node)
            if real is not None:
                self._fills[node] = real.detach().cpu()
            elif isinstance(val, torch.Tensor):
                if not val.dtype.is_floating_point:
                    raise ProbeFailed(f"no value for the integer tensor {node.name}")
                self._fills[node] = torch.randn(_shape(node, val), generator=self._gen)
            elif isinstance(val, torch.SymInt):
                raise ProbeFailed(f"{node.name} is a size that depends on values", True)
            else:
                self._fills[node] = val
        return self._fills[node]

    def __call__(self, values: dict[fx.Node, torch.Tensor]) -> torch.Tensor:
        env = dict(values)
        try:
            for node in self.nodes:
                args, kwargs = fx.node.map_arg((node.args, node.kwargs),
                                               lambda n: env[n] if n in env else self._fill(n))
                args, kwargs = [_cpu(a) for a in args], {k: _cpu(v) for k, v in kwargs.items()}
                if node.op == "call_method":
                    env[node] = getattr(args[0], str(node.target))(*args[1:], **kwargs)
                elif node.target is operator.getitem:
                    env[node] = args[0][args[1]]
                else:
                    env[node] = node.target(*args, **kwargs)
        except ProbeFailed:
            raise
        except Exception as exc:  # an op that does not run on probe values
            raise ProbeFailed(f"{type(exc).__name__}: {exc}") from exc
        out = env.get(self.target)
        if not isinstance(out, torch.Tensor):
            raise ProbeFailed(f"{self.target.name} is not a tensor function of the sources")
        return out.float()

    def base(self) -> dict[fx.Node, torch.Tensor]:
        return {s: self.random(s) for s in self.sources}

    def elementwise(self) -> bool:
        """Does each source element reach at most one output element (no reduction, norm, matmul or attention
        on the way), and does the output depend on every source?"""
        x = self.base()
        y = self(x)
        for s in self.sources:
            flat = x[s].reshape(-1)
            moved = False
            for i in sorted({(k * flat.numel()) // BUMPS for k in range(BUMPS)} | {flat.numel() - 1}):
                bumped = dict(x)
                bumped[s] = flat.clone().index_add_(0, torch.tensor([i]), torch.full((1,), 4 * SCALE)).view_as(x[s])
                changed = int((self(bumped) != y).sum())
                if changed > 1:
                    return False
                moved |= changed == 1
            if not moved:
                return False
        return True

    def affine(self, source: fx.Node, columns: list[int] | None = None) -> bool:
        """Is the output affine in `source`'s `columns` (all if None), the other inputs held fixed?"""
        x = self.base()
        cols = torch.tensor(columns) if columns is not None else None
        a, b = x[source], self.random(source)

        def at(t: torch.Tensor) -> dict[fx.Node, torch.Tensor]:
            v = a.clone()
            if cols is None:
                v = t
            else:
                v[..., cols] = t[..., cols]
            return {**x, source: v}

        w = 2.5  # an affine map keeps f(w a + (1 - w) b) = w f(a) + (1 - w) f(b)
        want = w * self(at(a)) + (1 - w) * self(at(b))
        got = self(at(w * a + (1 - w) * b))
        return float((got - want).abs().max()) <= AFFINE_TOL * (float(want.abs().max()) + 1e-6)
