"""The op's leaf: everything that computes the AdaMoLE adapter, and nothing from the rest of the package.

    methods.py         the method table (`MethodSpec`): router rows, gate/threshold, kernel code
    routing_torch.py   the routing math in plain torch (forward and backward)
    adapter_torch.py   the op's torch path: dense formulation, forward and backward (the kernels' ground truth)
    routing_triton.py  the routing math as Triton device functions
    adapter_triton.py  the forward's Triton kernels and launchers (split over D, then a routing kernel; G sites
                       sharing x in one set of launches, or one)
    adapter_triton_bwd.py  the backward's Triton kernels and launchers (G sites, or one)
    triton_common.py   what the kernels share: device helpers, launch plumbing, tiling that fills the GPU
    direct.py          launches through kept builds, without Triton's Python dispatch per call
    plans.py           launch plans: each distinct call's tiles, grids and constexprs, worked out once
    backend.py         the `kernels` setting -> torch or triton for a call
    op.py              `torch.ops.amole.adapter` (+ backward): registration on first use, autograd
    op_linear.py       eager: the op with frozen projections folded in (one autograd node for those sharing x)
    mixed_torch.py     mixed batches: stacked adapters, each row routed by routing_torch's per-method functions

Tensors and scalars in, tensors out. Importing this package imports nothing (each name loads its module on
first use: `methods.py` alone needs no torch), and no module here imports triton or torch._inductor at import.
"""

from __future__ import annotations

import importlib

_NAMES = {"KERNELS": "backend", "SUPPORTED_DTYPES": "backend", "resolve_kernels": "backend",
          "triton_usable": "backend", "METHODS": "methods", "MethodSpec": "methods", "method_spec": "methods",
          "AdapterArgs": "op", "adapter": "op", "adapter_linear": "op_linear", "adapter_linears": "op_linear",
          "register": "op",
          "traced": "backend"}

__all__ = ["KERNELS", "METHODS", "SUPPORTED_DTYPES", "AdapterArgs", "MethodSpec", "adapter", "adapter_linear",
           "adapter_linears",
           "method_spec", "register", "resolve_kernels", "traced", "triton_usable"]


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
