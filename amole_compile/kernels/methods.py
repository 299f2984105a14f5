"""The method table: one `MethodSpec` per routing method, read by every layer (config, modules, the op, the
Triton kernels, the ONNX translation, the upstream-format import, the CLI).

Adding a method means: a row here, plus its routing math in the three places that compute it, each keyed by
`MethodSpec.code`:
    routing_torch.py          a per-method routing function and its branch in `method_routing` (which the op's
                              torch path and mixed batches, `mixed_torch.py`, both call; a constant of a new kind
                              also needs a `Stack.meta` column there), and its case in `route_backward`
    routing_triton.py         the Triton kernels' epilogue (`route`, `route_backward`)
    export/_translation.py    the ONNX routing (`route`)
`tests/test_forms.py` then runs it through every form (torch, Triton, mixed batch, ONNX). The math itself is
in docs/math.md.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What one routing method is made of.

    name            the `AdaMoLEConfig.method` string
    code            the routing selector the kernels and the ONNX translation switch on (METHOD constexpr)
    has_gate        a softmax gate Wg [E, D] (router rows 0..E-1)
    has_threshold   a threshold net wt [1, D], bt [1] (router row E)
    uses_top_k      routes to the top-k experts (`AdaMoLEConfig.top_k`)
    fixed_experts   the only allowed expert count (LoRA: 1), or None
    upstream_type   the `peft_type` of the upstream repository's checkpoints (docs/upstream_format.md)
    """

    name: str
    code: int
    has_gate: bool
    has_threshold: bool
    uses_top_k: bool
    fixed_experts: int | None
    upstream_type: str

    def router_rows(self, num_experts: int) -> int:
        """Rows of the stacked router weight [Wg; wt]: E gate rows, then one threshold row."""
        return (num_experts if self.has_gate else 0) + (1 if self.has_threshold else 0)

    def router_params(self, num_experts: int, d_in: int) -> int:
        """Router parameters of one site with input width d_in (the threshold bias included)."""
        return self.router_rows(num_experts) * d_in + (1 if self.has_threshold else 0)


ADAMOLE = MethodSpec("adamole", 0, has_gate=True, has_threshold=True, uses_top_k=False, fixed_experts=None,
                     upstream_type="ADAMOLE")
MOLE = MethodSpec("mole", 1, has_gate=True, has_threshold=False, uses_top_k=True, fixed_experts=None,
                  upstream_type="MOLE")
LORA = MethodSpec("lora", 2, has_gate=False, has_threshold=False, uses_top_k=False, fixed_experts=1,
                  upstream_type="LORA")

METHODS: dict[str, MethodSpec] = {m.name: m for m in (ADAMOLE, MOLE, LORA)}


def method_spec(name: str) -> MethodSpec:
    """The spec of method `name`; ValueError naming the known methods otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {tuple(METHODS)}") from None
