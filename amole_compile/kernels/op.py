"""The AdaMoLE op: `torch.ops.amole.adapter`, the narrow waist every path calls, and its autograd.

One registered op (autograd through a second op `amole::adapter_backward`) holding the dense formulation of
docs/math.md for every method of `methods.py`. Static shapes, no data-dependent indexing. Both ops are
`torch.library.triton_op`s: their bodies call only torch ops (`adapter_torch.py`) or `wrap_triton` kernels
(`adapter_triton.py`, chosen by `resolve_kernels`), so the body doubles as the fake kernel and `torch.compile`
traces through it, while `torch.export` keeps `amole.adapter` as one node (which the ONNX exporter translates).

The ops register on first use (`register()`, called by `adapter()` and by whoever emits op nodes): the
`triton_op` decorator imports triton and torch._inductor, which `import amole_compile` must not.

Outputs: (out [T, O], scores [T, E], mask [T, E] bool, za [T, K], zr [T, Er], aux [], aux_sums [2, E]); routing
(zr, scores, aux) is float32 (float64 for float64 inputs). `za` and `zr` are saved for the backward, which
recomputes the cheap routing instead of storing it. `aux` is the site's load-balancing loss when `with_aux` asks
for it (a method with a gate, T > 0; otherwise `aux` and `aux_sums` are empty): computed by the op, its gradient
reaches the scores inside the backward, with no [T, E] tensor of its own. Legend as in `adapter_torch.py`.
"""

from __future__ import annotations

import functools
import inspect
import os
from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch import Tensor

from . import backend
from .adapter_torch import adapter_backward_torch, adapter_torch, as_dtype
from .backend import ENV_VAR, requested_kernels, resolve_kernels, traced
from .blocks import MAX_K_P, max_tokens

_LIB = "amole"
_registered: SimpleNamespace | None = None


class AdapterArgs(NamedTuple):
    """The op's arguments in schema order: the one definition every caller builds (`ExpertSet.op_args` for the
    module and graph paths; the ONNX translations take the same list)."""

    x: Tensor  # [T, D]
    drop_mask: Tensor | None  # [T, D] bool keep-mask, None when not dropping
    lora_a: Tensor  # [K, D]
    lora_b: Tensor  # [O, K]
    gate_w: Tensor | None  # [E, D]
    thr_w: Tensor | None  # [1, D]
    thr_b: Tensor | None  # [1]
    base: Tensor | None  # [T, O] the projection's output, added in place of a separate add
    method: str
    num_experts: int
    top_k: int
    scale: float
    max_threshold: float
    drop_scale: float  # 1 / (1 - dropout)
    kernels: str
    with_aux: bool = False  # compute the aux loss (training forwards of a method with a gate)


def _use_triton(kernels: str, x: Tensor, num_experts: int, lora_a: Tensor, lora_b: Tensor) -> bool:
    """Triton for this call? Decided before any launch (`resolve_kernels`: dtype, device, E and rank within the
    kernels' limits, and the call's tokens within their 32-bit indexing). Under TRITON_INTERPRET=1 kernels run
    eagerly and cannot be traced, so a traced call (fake tensors: torch.compile, opcheck's fake checks) takes the
    torch path, which computes the same. A traced 'auto' call takes the path `backend.COMPILED_AUTO` names (the
    measured faster one under inductor)."""
    rank = lora_a.shape[0] // max(num_experts, 1)
    if resolve_kernels(kernels, x, num_experts, rank, out_features=lora_b.shape[0]) != "triton":
        return False
    if not traced(x):
        return True
    if os.environ.get("TRITON_INTERPRET") == "1":
        from torch._subclasses.fake_tensor import is_fake

        if is_fake(x):
            return False
    return backend.COMPILED_AUTO == "triton" or requested_kernels(kernels) != "auto"


def _adapter_impl(
    x: Tensor, drop_mask: Tensor | None, lora_a: Tensor, lora_b: Tensor, gate_w: Tensor | None,
    thr_w: Tensor | None, thr_b: Tensor | None, base: Tensor | None, method: str, num_experts: int,
    top_k: int, scale: float, max_threshold: float, drop_scale: float, kernels: str, with_aux: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """AdaMoLE / MoLE / LoRA adapter on x [T, D] -> (out [T, O], scores, mask, za, zr, aux, aux_sums); see module
    doc."""
    args = (x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, base, method, num_experts, top_k, scale,
            max_threshold, drop_scale, with_aux)
    return forward_on(_use_triton(kernels, x, num_experts, lora_a, lora_b), args)


def _adapter_backward_impl(
    grad_out: Tensor, grad_scores: Tensor | None, x: Tensor, drop_mask: Tensor | None, lora_a: Tensor,
    lora_b: Tensor, gate_w: Tensor | None, thr_w: Tensor | None, thr_b: Tensor | None, za: Tensor,
    zr: Tensor, method: str, num_experts: int, top_k: int, scale: float, max_threshold: float,
    drop_scale: float, need_grad_x: bool, kernels: str, grad_aux: Tensor | None = None,
    aux_sums: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Grads (x, A, B, gate, threshold weight, threshold bias); empty tensors for absent parameters. `grad_aux`
    (the aux loss's gradient, []) with the forward's `aux_sums` adds the aux loss's share to the scores'."""
    args = (grad_out, grad_scores, x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, za, zr, method,
            num_experts, top_k, scale, max_threshold, drop_scale, need_grad_x, grad_aux, aux_sums)
    return _backward_on(_use_triton(kernels, x, num_experts, lora_a, lora_b), args)


def forward_on(triton: bool, args: tuple, wrap: bool | None = None, own_base: bool = False):
    """The forward on the Triton path (`wrap`: the call is traced; None: it asks) or the torch path; `args` in
    `adapter_torch`'s order (`own_base`: the output may be base itself)."""
    if triton:
        from .adapter_triton import adapter_triton

        return adapter_triton(*args, wrap=wrap, own_base=own_base)
    return adapter_torch(*args, own_base=own_base)


def _backward_on(triton: bool, args: tuple, wrap: bool | None = None):
    """The backward on the Triton path or the torch path, as `forward_on`; `args` in
    `adapter_backward_torch`'s order."""
    if triton:
        from .adapter_triton_bwd import adapter_backward_triton

        return adapter_backward_triton(*args, wrap=wrap)
    return adapter_backward_torch(*args)


_BASE = AdapterArgs._fields.index("base")
_N_TENSORS = _BASE + 1  # the tensor arguments come first, then the scalars
_KERNELS = AdapterArgs._fields.index("kernels")


def _setup_context(ctx, inputs, output):
    a = AdapterArgs(*inputs)
    ctx.save_for_backward(a.x, a.drop_mask, a.lora_a, a.lora_b, a.gate_w, a.thr_w, a.thr_b, output[3], output[4],
                          output[6])
    ctx.scalars = inputs[_N_TENSORS:]
    ctx.has_base = a.base is not None


def _backward(ctx, grad_out, grad_scores, _grad_mask, _grad_za, _grad_zr, grad_aux, _grad_sums, backward_op=None):
    saved = ctx.saved_tensors
    grad_out = grad_out_of(grad_out, saved)
    gx, *grads = site_grads(saved, ctx.scalars, ctx.needs_input_grad[0], grad_out, grad_scores, grad_aux,
                            backward_op or torch.ops.amole.adapter_backward)
    return (gx, None, *grads, grad_out if ctx.has_base else None) + (None,) * len(ctx.scalars)


def grad_out_of(grad_out: Tensor | None, saved: tuple) -> Tensor:
    """The output's gradient [T, O] in x's dtype (zeros when the output was not used); `saved` as `site_grads`."""
    x, lora_b = saved[0], saved[3]
    if grad_out is None:
        return x.new_zeros(x.shape[0], lora_b.shape[0])
    return as_dtype(grad_out, x.dtype)


def site_grads(saved: tuple, scalars: tuple, need_x: bool, grad_out: Tensor, grad_scores: Tensor | None,
               grad_aux: Tensor | None, backward_op) -> tuple:
    """One site's gradients (x, A, B, gate, threshold weight, threshold bias; None for x when not `need_x` and
    for absent parameters) from its ten saved tensors (x [T, D], the keep-mask, A, B, gate, threshold weight and
    bias, za, zr, aux_sums), the op's scalars (method ... kernels, in the op's order) and `grad_out_of`'s
    gradient; `backward_op` takes `amole.adapter_backward`'s arguments."""
    x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, za, zr, aux_sums = saved
    method, e, k, scale, cap, drop_scale, kernels = scalars[:7]
    if aux_sums.numel() == 0:
        grad_aux = None
    gx, ga, gb, gg, gtw, gtb = backward_op(
        grad_out.contiguous(), grad_scores, x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, za, zr,
        method, e, k, scale, cap, drop_scale, need_x, kernels, grad_aux, None if grad_aux is None else aux_sums)
    return (gx if need_x else None, ga, gb, gg if gate_w is not None else None,
            gtw if thr_w is not None else None, gtb if thr_b is not None else None)


def register() -> SimpleNamespace:
    """Register `torch.ops.amole.adapter` and `amole.adapter_backward` once (this imports triton's glue).

    Returns the registered ops (`.adapter`, `.adapter_backward`: `torch.library` CustomOpDefs, callable and
    accepted by `torch.library.opcheck`).
    """
    global _registered
    if _registered is None:
        fwd = torch.library.triton_op(f"{_LIB}::adapter", mutates_args=())(_adapter_impl)
        bwd = torch.library.triton_op(f"{_LIB}::adapter_backward", mutates_args=())(_adapter_backward_impl)
        fwd.register_autograd(_backward, setup_context=_setup_context)
        for device_type in AUTOCAST_DEVICES:
            key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
            torch.library.impl(f"{_LIB}::adapter", key, functools.partial(_adapter_autocast, device_type))
            torch.library.impl(f"{_LIB}::adapter_backward", key, functools.partial(_backward_autocast, device_type))
        _registered = SimpleNamespace(adapter=fwd, adapter_backward=bwd)
    return _registered


AUTOCAST_DEVICES = ("cpu", "cuda")  # where the ops take autocast's dispatch key (`_adapter_autocast`)


def _adapter_autocast(device_type: str, *args):
    """The op under autocast (as a graph's inserted node runs in a bf16 / fp16 autocast region): the adapter
    computes in its parameters' dtype, as on the module path (`AdapterGroup.add_to`), not autocast's: x and the base
    are cast to lora_a's dtype, nothing inside is autocast (its saved za / h would otherwise be in the autocast dtype
    and meet gradients of the parameters' in the backward), and the output takes the base's dtype back."""
    a = AdapterArgs(*args)
    dtype = a.lora_a.dtype
    base = a.base
    with torch.autocast(device_type, enabled=False):
        res = torch.ops.amole.adapter.default(*a._replace(
            x=as_dtype(a.x, dtype), base=None if base is None else as_dtype(base, dtype)))
    if base is not None and base.dtype != dtype:
        return (res[0].to(base.dtype), *res[1:])
    return res


def _backward_autocast(device_type: str, *args):
    """The backward op under autocast (`backward()` called inside an autocast region): nothing inside is autocast,
    the gradients come in the dtypes of the forward's inputs."""
    with torch.autocast(device_type, enabled=False):
        return torch.ops.amole.adapter_backward.default(*args)


_EAGER_CHOICE: dict = {}  # (kernels, AMOLE_KERNELS, TRITON_INTERPRET, device, dtype, E, K) -> Triton?


def eager_choice(kernels: str, x: Tensor, num_experts: int, k: int) -> bool:
    """What `_use_triton` says of an eager call (no fake tensors) but for its tokens, remembered per setting,
    environment, device (GPUs of one machine may differ: `backend.device_unfit`), dtype, E and K:
    `resolve_kernels` costs ~10 us, twice per site and step. A miss asks it (its one-time warning, or its error for
    an impossible `kernels='triton'`, which is not remembered)."""
    env = os.environ
    key = (kernels, env.get(ENV_VAR), env.get("TRITON_INTERPRET"), x.device, x.dtype, num_experts, k,
           backend.generation)
    choice = _EAGER_CHOICE.get(key)
    if choice is None:
        choice = _EAGER_CHOICE[key] = resolve_kernels(kernels, x, num_experts, k // max(num_experts, 1)) == "triton"
    return choice


def eager_triton(kernels: str, x: Tensor, num_experts: int, k: int, out_features: int, groups: int = 1) -> bool:
    """`_use_triton` for an eager call: `eager_choice`, then, asked every call, whether its tokens stay within the
    kernels' 32-bit indexing for `groups` sites whose widest output or gradient row is `out_features` (past it,
    `resolve_kernels` with them: the torch path with one warning, or an error for `kernels='triton'`)."""
    choice = eager_choice(kernels, x, num_experts, k)
    d = x.shape[-1]
    if choice and x.numel() > max_tokens(max(d, out_features), groups, MAX_K_P) * d:  # then exactly (K_P <= MAX)
        choice = resolve_kernels(kernels, x, num_experts, k // max(num_experts, 1), out_features, groups) == "triton"
    return choice


class _NoHigherOrder(torch.autograd.Function):
    """The op's gradients, unchanged, under create_graph=True; differentiating them raises. The eager backward is
    the kernels' or a hand-written formula over intermediates the forward saved (za, zr): its own derivative
    would leave out what flows through them, a wrong second derivative with no error. Inputs: how many
    gradients, the gradients, then the tensors the forward saved (x, the parameters): the node hangs on them, so
    that any derivative of a gradient with respect to them (`.backward()` or `torch.autograd.grad`) reaches it."""

    @staticmethod
    def forward(ctx, n, *tensors):
        return tuple(g.detach() for g in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "amole_compile: a second derivative through the AdaMoLE op is not supported (a gradient penalty, a "
            "Hessian-vector product): its backward is the Triton kernels' or the torch path's own formula, not "
            "differentiable. Gradients taken with create_graph=True are right; they cannot be differentiated again")


def first_order_only(backward):
    """An eager node's `backward`, whose gradients are right but not differentiable (the kernels', or a
    hand-written formula over intermediates the forward saved): under create_graph=True (grad mode on in a
    backward) it runs without a graph and its results come back behind `_NoHigherOrder`, hung on the forward's
    saved tensors. torch's `once_differentiable` hangs its error on fresh leaves, which
    `torch.autograd.grad(..., params)` never reaches: it returns None for them, or says they were unused."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        with torch.no_grad():
            out = backward(ctx, *grads)
        tensors = [g for g in out if g is not None]
        anchors = [t for t in ctx.saved_tensors if t is not None and t.requires_grad]
        if not tensors or not anchors:
            return out
        guarded = iter(_NoHigherOrder.apply(len(tensors), *tensors, *anchors))
        return tuple(None if g is None else next(guarded) for g in out)

    return wrapper


def not_a_view(out: Tensor) -> Tensor:
    """An eager node's output as an alias of its storage, not a view: the model may write into it in place (`q *=
    scale`, Falcon's MLP `+=`), which autograd refuses on a view output of a multi-output Function. (Nothing the
    nodes save reads their outputs.)"""
    return out.detach() if out._base is not None else out


class _EagerAdapter(torch.autograd.Function):
    """The op's forward and backward without the `torch.library` dispatch, for plain eager calls.

    Same implementation and the same autograd formula as the registered op; measured on an H100, the custom-op
    dispatch cost about 1.1 ms of host time per call, more than the adapter's kernels take on the GPU. The
    call is known not to be traced, so neither direction asks again.
    """

    @staticmethod
    def forward(ctx, *inputs):
        x = inputs[0]
        ctx.x_shape = None if x.dim() == 2 else x.shape  # x [..., D]: flattened here, where no view is recorded
        if ctx.x_shape is not None:
            inputs = _flat(inputs)
        a = AdapterArgs(*inputs)
        ctx.triton = eager_triton(a.kernels, a.x, a.num_experts, a.lora_a.shape[0], a.lora_b.shape[0])  # backward too
        try:
            out = forward_on(ctx.triton, (*inputs[:_KERNELS], a.with_aux), wrap=False)
        except backend.build_errors() as exc:  # (a compile error of the kernels: the torch path, from now on)
            backend.unbuildable(exc, a.kernels, a.x, a.num_experts, a.lora_a.shape[0] // max(a.num_experts, 1))
            ctx.triton = False
            out = forward_on(False, (*inputs[:_KERNELS], a.with_aux))
        _setup_context(ctx, inputs, out)
        if ctx.x_shape is not None:
            out = _unflat(out, ctx.x_shape)
            out = (not_a_view(out[0]), *out[1:])
        ctx.mark_non_differentiable(out[2], out[3], out[4], out[6])
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out, *grads):
        shape, op = ctx.x_shape, EAGER_BACKWARD[ctx.triton]
        if shape is None:
            return _backward(ctx, grad_out, *grads, backward_op=op)
        if grad_out is not None:
            grad_out = grad_out.reshape(-1, grad_out.shape[-1])  # [T, O]
        out = list(_backward(ctx, grad_out, *grads, backward_op=op))  # in the op's argument order
        gx, gbase = out[0], out[_BASE]
        out[0] = None if gx is None else gx.reshape(shape)
        out[_BASE] = None if gbase is None else gbase.reshape(*shape[:-1], gbase.shape[-1])
        return tuple(out)


def _flat(inputs: tuple) -> tuple:
    """The op's arguments with x [..., D], the keep-mask [..., D] and base [..., O] flattened to [T, D] / [T, O]."""
    x, mask, base = inputs[0], inputs[1], inputs[_BASE]
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    return (x2, None if mask is None else mask.reshape(x2.shape), *inputs[2:_BASE],
            None if base is None else base.reshape(-1, base.shape[-1]), *inputs[_N_TENSORS:])


def _unflat(out: tuple, x_shape: torch.Size) -> tuple:
    """The op's outputs with out [T, O] viewed as [..., O] for x [..., D]; the routing outputs stay per token."""
    return (out[0].view(*x_shape[:-1], out[0].shape[1]), *out[1:])


def _eager_backward(triton: bool):
    """`_adapter_backward_impl` for an eager call whose forward chose `triton` (or the torch path)."""
    def backward(*args):  # amole.adapter_backward's arguments; `kernels` (decided already) is dropped
        rest = args[:_BWD_KERNELS] + args[_BWD_KERNELS + 1:]
        if triton:
            x, e = args[_BWD_X], args[_BWD_E]
            rank = args[_BWD_A].shape[0] // max(e, 1)
            if backend.builds(x, e, rank):
                try:
                    return _backward_on(True, rest, wrap=False)
                except backend.build_errors() as exc:  # the torch path takes the forward's za / zr alike
                    backend.unbuildable(exc, args[_BWD_KERNELS], x, e, rank)
        return _backward_on(False, rest)

    return backward


_BWD_ARGS = list(inspect.signature(_adapter_backward_impl).parameters)
_BWD_KERNELS, _BWD_X, _BWD_A, _BWD_E = map(_BWD_ARGS.index, ("kernels", "x", "lora_a", "num_experts"))
EAGER_BACKWARD = {True: _eager_backward(True), False: _eager_backward(False)}  # the forward chose Triton?


def adapter(x: Tensor, drop_mask: Tensor | None, lora_a: Tensor, lora_b: Tensor, gate_w: Tensor | None,
            thr_w: Tensor | None, thr_b: Tensor | None, base: Tensor | None, method: str, num_experts: int,
            top_k: int, scale: float, max_threshold: float, drop_scale: float, kernels: str, with_aux: bool = False):
    """The adapter op on x [..., D] (drop_mask [..., D], base [..., O]: out [..., O]; the routing outputs are per
    token, [T, ...] with T the leading dims' product); other arguments as `_adapter_impl`. A traced call (compile,
    export) records `torch.ops.amole.adapter` (registered on first use) on x flattened to [T, D]; an eager call
    runs the same implementation and autograd formula directly, without the custom-op dispatch, and flattens
    inside, where the views cost no autograd nodes."""
    if _registered is None:
        register()
    args = (x, drop_mask, lora_a, lora_b, gate_w, thr_w, thr_b, base, method, num_experts, top_k, scale,
            max_threshold, drop_scale, kernels, with_aux)
    if not traced(x):
        return _EagerAdapter.apply(*args)
    if x.dim() == 2:
        return torch.ops.amole.adapter(*args)
    return _unflat(torch.ops.amole.adapter(*_flat(args)), x.shape)
