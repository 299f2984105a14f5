"""The op's leaf: everything that computes the AdaMoLE adapter, and nothing from the rest of the package.

    methods.py         the method table (`MethodSpec`): router rows, gate/threshold, kernel code
    routing_torch.py   the routing math in plain torch (forward and backward)
    adapter_torch.py   the op's torch path: dense formulation, forward and backward (the kernels' ground truth)
    routing_triton.py  the routing math as Triton device functions
    adapter_triton.py  the Triton kernels and their launchers
    backend.py         the `kernels` setting -> torch or triton for a call
    op.py              `torch.ops.amole.adapter` (+ backward): registration on first use, autograd
    mixed_torch.py     mixed batches: stacked adapters, each row routed by routing_torch's per-method functions

Tensors and scalars in, tensors out. Importing this package imports no triton and no torch._inductor.
"""

from __future__ import annotations

from .backend import KERNELS, SUPPORTED_DTYPES, resolve_kernels, triton_usable
from .methods import METHODS, MethodSpec, method_spec
from .op import AdapterArgs, adapter, register

__all__ = ["KERNELS", "METHODS", "SUPPORTED_DTYPES", "AdapterArgs", "MethodSpec", "adapter", "method_spec",
           "register", "resolve_kernels", "triton_usable"]
