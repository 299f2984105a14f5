"""The adapter op with frozen projections folded in, for eager calls: `adapter_linear`, `adapter_linears`.

One autograd node computes y_p = F.linear(x, W_p, b_p) for one or more projections p that read the same x (an
attention block's separate q, k and v), and adds each site's adapter into its block of y_p's columns in place
(`addmm_`, Unsloth's `matmul_lora`). A projection's sites are those of its roles, owning contiguous column
blocks in role order: one site for an unfused projection, q | k | v or gate | up for a fused one. The backward
sums every site's x gradient into one tensor and adds each grad_y_p W_p into it in place (`addmm_`).

Unfolded, each projection's own node and each site's node gave autograd a [T, D] x gradient to sum, and a fused
projection's deltas were concatenated and added to y: on a GPU, launches and whole [T, D] / [T, O] passes over
memory per site. Same forward and backward per site as `op._EagerAdapter` (`op.forward_on`, `op.site_grads`):
the routing outputs and parameter gradients are the unfolded path's bit for bit, and so is a single site's
output. The outputs and x's gradient of several sites are rounded once per sum instead of per add.

Legend: T tokens (x's leading dims flattened), D in features, O out features (of a projection), O_s a site's
columns, S sites, P projections.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import backend
from .adapter_torch import as_dtype
from .backend import ENV_VAR, resolve_kernels
from .blocks import index_unfit, max_tokens, padded_columns
from .op import (
    EAGER_BACKWARD,
    AdapterArgs,
    eager_choice,
    first_order_only,
    forward_on,
    grad_out_of,
    not_a_view,
    site_grads,
)

Projection = tuple[Sequence[AdapterArgs], Tensor, "Tensor | None"]  # (its sites in column order, W, b)


def adapter_linear(sites: Sequence[AdapterArgs], weight: Tensor, bias: Tensor | None) -> tuple[Tensor, list]:
    """y = F.linear(x, weight [O, D], bias [O]) + each site's adapter on its block of columns, in one autograd
    node. `sites`: the op's arguments of each site in column order (x [..., D] shared, base None); their B's rows
    add up to O. -> (y [..., O], per site (scores [T, E], mask [T, E], aux), the routing the statistics read).

    Eager calls only; the caller checks that the fold applies (`AdaMoLELinear.folding_group`): not traced,
    weight and bias plain parameters that need no gradient, x and the adapters in the weight's dtype and device.
    """
    return adapter_linears([(sites, weight, bias)])[0]


def adapter_linears(projections: Sequence[Projection]) -> list[tuple[Tensor, list]]:
    """`adapter_linear` for several projections reading the same x, in one autograd node: one x gradient, the sum
    of all of theirs. -> per projection (y [..., O], per site (scores, mask, aux))."""
    meta = tuple((tuple(a.lora_b.shape[0] for a in sites), tuple(_key(a) for a in sites))
                 for sites, _, _ in projections)
    layers = [t for _, w, b in projections for t in (w, b)]  # frozen: no gradient, not autograd inputs
    masks = [a.drop_mask for sites, _, _ in projections for a in sites]
    params = [t for sites, _, _ in projections for a in sites for t in (a.lora_a, a.lora_b, a.gate_w, a.thr_w, a.thr_b)]
    routing: list = []  # the forward puts each site's (scores, mask) here
    out = _EagerLinearAdapter.apply(projections[0][0][0].x, meta, routing, (layers, masks), *params)
    n_p, res, i = len(meta), [], 0
    for p, (sizes, _) in enumerate(meta):
        res.append((out[p], [(*routing[i + s], out[n_p + i + s]) for s in range(len(sizes))]))
        i += len(sizes)
    return res


def _key(a: AdapterArgs) -> tuple:
    """A site's op scalars (method ... with_aux), then what else fixes how it runs: its rank K and which of its
    keep-mask, gate and threshold weight it has."""
    return (a.method, a.num_experts, a.top_k, a.scale, a.max_threshold, a.drop_scale, a.kernels, a.with_aux,
            a.lora_a.shape[0], a.drop_mask is None, a.gate_w is None, a.thr_w is None)


class _EagerLinearAdapter(torch.autograd.Function):
    """Inputs: x [..., D], meta (per projection: each site's columns O_s and its `_key`), `routing` (a list the
    forward fills with each site's (scores, mask)), `frozen` (each projection's W [O, D] and b [O] (or None), and
    each site's keep-mask (or None): tensors that take no gradient, kept out of autograd's inputs, whose
    bookkeeping costs host time per tensor), then each site's five parameters. Outputs (autograd's): each
    projection's y [..., O], then each site's aux loss (empty without one); the routing is handed over in
    `routing`, outside autograd: on this path only the statistics read it (the scores get no gradient). Fewer
    outputs, less host time per call. Saves x, the W's, each site's five parameters and each run's four tensors
    (`_Run`; the projections' own nodes saved x and W: W's version is checked, saved here too)."""

    @staticmethod
    def forward(ctx, x, meta, routing, frozen, *params):
        layers, masks = frozen
        n_p = len(meta)
        plan = _plan(meta, x)
        x2 = x.reshape(-1, x.shape[-1])  # [T, D]
        ys = [torch.nn.functional.linear(x, layers[2 * p], layers[2 * p + 1]) for p in range(n_p)]  # [..., O] each
        y2s = ys if x.dim() == 2 else [y.view(-1, y.shape[-1]) for y in ys]  # [T, O] each
        blocks = _blocks(plan.columns, y2s)
        outs: list = [None] * len(plan.columns)
        saved = [x2, *layers[::2], *params]
        for run in plan.runs:
            saved += run.forward(x2, masks, params, blocks, outs)
        ctx.x_shape, ctx.plan = x.shape, plan
        ctx.save_for_backward(*saved)
        ctx.set_materialize_grads(False)
        routing[:] = [o[:2] for o in outs]
        return (*map(not_a_view, ys), *(o[2] for o in outs))  # (F.linear on [..., D] returns a view)

    @staticmethod
    @first_order_only
    def backward(ctx, *grads):
        saved, plan = ctx.saved_tensors, ctx.plan
        n_p, n_s = plan.n_projections, len(plan.columns)
        x2, ws = saved[0], saved[1:1 + n_p]
        params = [saved[1 + n_p + _PARAMS * s: 1 + n_p + _PARAMS * (s + 1)] for s in range(n_s)]
        run_saved = saved[1 + n_p + _PARAMS * n_s:]
        g2s = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grads[:n_p]]  # [T, O] each
        blocks = _blocks(plan.columns, g2s)
        need_x, gx, flat = ctx.needs_input_grad[0], None, [None] * (_PARAMS * n_s)
        for i, run in enumerate(plan.runs):
            gxr = run.backward(x2, params, run_saved[_SAVED * i:_SAVED * (i + 1)], blocks, grads[n_p:], need_x, flat)
            gx = gxr if gx is None else gx.add_(gxr)  # [T, D], ours
        if gx is not None:
            for g2, w in zip(g2s, ws, strict=True):
                if g2 is not None:
                    gx.addmm_(as_dtype(g2, gx.dtype), w)  # + grad_y W: the projection's x gradient
        return (None if gx is None else gx.reshape(ctx.x_shape), None, None, None, *flat)


_PARAMS = 5  # the parameters each site passes and saves (A, B, gate, threshold weight, threshold bias)
_SAVED = 4  # the tensors each run saves (keep-masks, za, zr, aux_sums)
_SCALARS = 8  # a `_key` starts with the op scalars (method ... with_aux)


class _Plan(NamedTuple):
    """How a node runs: per site (its projection, first column, columns, whether it owns all of them), the sites
    in runs, and the most tokens its Triton runs take in the kernels' 32-bit indexing (`blocks.max_tokens`)."""

    n_projections: int
    columns: tuple[tuple[int, int, int, bool], ...]
    runs: tuple[_Run, ...]
    max_tokens: int


_PLANS: dict = {}  # (meta, AMOLE_KERNELS, TRITON_INTERPRET, device, dtype, backend.generation) -> _Plan
INDEX_TOKENS = 1 << 62  # a plan with no Triton run takes any number of tokens


def _plan(meta: tuple, x: Tensor) -> _Plan:
    """The node's `_Plan`, worked out once per meta and the kernel choice's inputs (`op.eager_choice`'s: a node
    runs the same way call after call); a call with more tokens than one of its Triton runs takes gets a plan of
    its own, uncached (`_make_plan` with its tokens)."""
    env = os.environ
    key = (meta, env.get(ENV_VAR), env.get("TRITON_INTERPRET"), x.device, x.dtype,  # the device: GPUs differ
           backend.generation)  # (a failed build sends calls like it to the torch path)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 1024:
            _PLANS.clear()
        plan = _PLANS[key] = _make_plan(meta, x)
    if x.numel() > plan.max_tokens * x.shape[-1]:
        return _make_plan(meta, x, long=True)
    return plan


def _make_plan(meta: tuple, x: Tensor, long: bool = False) -> _Plan:
    """Sites on the Triton path with the same `_key` in one run of G sites (the kernels take them in one set of
    launches); each site on the torch path alone. An impossible `kernels='triton'` raises here, uncached. `long`:
    for this call's tokens, a Triton run past the kernels' 32-bit indexing (`blocks.index_unfit`) is asked again
    (`resolve_kernels`: one warning, or an error for `kernels='triton'`) and its sites run on the torch path."""
    columns, runs, d = [], {}, x.shape[-1]
    for p, (sizes, keys) in enumerate(meta):
        c0 = 0
        for n, key in zip(sizes, keys, strict=True):
            s = len(columns)
            columns.append((p, c0, n, c0 == 0 and n == sum(sizes)))
            c0 += n
            _, e, _, _, _, _, kernels, _, k = key[:_SCALARS + 1]  # (the op scalars, then the rank K)
            triton = eager_choice(kernels, x, e, k)
            runs.setdefault(key if triton else s, (triton, key, []))[2].append(s)
    out, most = [], INDEX_TOKENS
    for triton, key, sites in runs.values():
        _, e, _, _, _, _, kernels, _, k = key[:_SCALARS + 1]
        rank = k // max(e, 1)
        k_p = padded_columns(e, rank)
        wide = max(sum(meta[columns[s][0]][0]) for s in sites)  # the widest projection: its gradient's row stride
        if triton and long and index_unfit(x.numel() // d, d, wide, len(sites), k_p):
            triton = resolve_kernels(kernels, x, e, rank, wide, len(sites)) == "triton"  # (warns, or raises)
        if triton:
            most = min(most, max_tokens(max(d, wide), len(sites), k_p))
            out.append(_Run(True, tuple(sites), key[:_SCALARS]))
        else:
            out += [_Run(False, (s,), key[:_SCALARS]) for s in sites]
    return _Plan(len(meta), tuple(columns), tuple(out), most)


def _blocks(columns: tuple, y2s: list) -> list:
    """Each site's columns of its projection's y2 [T, O] (or gradient; None stays None): [T, O_s]."""
    return [y2s[p] if whole or y2s[p] is None else y2s[p][:, c0:c0 + n] for p, c0, n, whole in columns]


class _Run(NamedTuple):
    """Sites of the node computed together: G sites on the Triton path (`adapter_triton_group`, one set of
    launches), or one site on the torch path (`forward_on`, `site_grads`). `sites`: their indices in the node;
    `scalars`: their op scalars (method ... with_aux)."""

    triton: bool
    sites: tuple[int, ...]
    scalars: tuple

    def forward(self, x2: Tensor, masks: list, params: tuple, blocks: list, outs: list) -> list:
        """Add each site's up-projection into its block, put its (scores, mask, aux) in `outs` -> the four tensors
        to save. `masks`: each site's keep-mask (or None); `params`: each site's five parameters, in turn."""
        method, e, k, scale, cap, drop_scale, kernels, with_aux = self.scalars
        if not self.triton:
            s = self.sites[0]
            mask = None if masks[s] is None else masks[s].reshape(x2.shape)  # [T, D]
            return [mask, *self._site_forward(s, x2, mask, params, blocks, outs)]
        stacked = _stack([masks[s] for s in self.sites], x2)  # [G, T, D] or None
        per = [[params[_PARAMS * s + j] for s in self.sites] for j in range(_PARAMS)]  # per parameter, G
        try:
            ys, scores, sel, za, zr, aux, sums = _triton()[0](
                x2, stacked, *per, [blocks[s] for s in self.sites], method, e, k, scale, cap, drop_scale, with_aux,
                wrap=False, own_base=True)
        except backend.build_errors() as exc:  # a kernel does not build: this run and the next on the torch path
            backend.unbuildable(exc, kernels, x2, e, per[0][0].shape[0] // max(e, 1))
            return self._forward_torch(x2, stacked, params, blocks, outs)
        auxes = aux.unbind(0) if aux.numel() else (aux,) * len(self.sites)
        for s, y, sc, m, a in zip(self.sites, ys, scores.unbind(0), sel.unbind(0), auxes, strict=True):
            _into(blocks[s], y)
            outs[s] = (sc, m, a)
        return [stacked, za, zr, sums]

    def _forward_torch(self, x2: Tensor, stacked: Tensor | None, params: tuple, blocks: list, outs: list) -> list:
        """`forward` of a Triton run on the torch path, site by site (a kernel failed to build), saving what the
        Triton run saves: each site's za, zr and aux sums stacked [G, ...]."""
        saved = [self._site_forward(s, x2, None if stacked is None else stacked[j], params, blocks, outs)
                 for j, s in enumerate(self.sites)]
        za, zr, sums = (torch.stack(v) for v in zip(*saved, strict=True))
        return [stacked, za, zr, sums]

    def _site_forward(self, s: int, x2: Tensor, mask: Tensor | None, params: tuple, blocks: list, outs: list) -> tuple:
        """Site s on the torch path with its keep-mask [T, D] (or None): its up-projection added into its block,
        its (scores, mask, aux) put in `outs` -> what it saves (za, zr, aux sums)."""
        method, e, k, scale, cap, drop_scale, _, with_aux = self.scalars
        out = forward_on(False, (x2, mask, *params[_PARAMS * s:_PARAMS * (s + 1)], blocks[s], method, e, k, scale,
                                 cap, drop_scale, with_aux), own_base=True)
        _into(blocks[s], out[0])
        outs[s] = (out[1], out[2], out[5])
        return out[3], out[4], out[6]

    def backward(self, x2: Tensor, params: list, saved: tuple, blocks: list, aux_grads: tuple, need_x: bool,
                 flat: list) -> Tensor | None:
        """Each site's parameter gradients into `flat` (the node's parameters' order) -> the run's x gradient [T, D]
        (None without `need_x`). `params`: each site's five parameters; `blocks`: each site's columns of its
        projection's output gradient (or None); `aux_grads`: each site's aux loss's gradient (or None)."""
        masks, za, zr, sums = saved
        if not self.triton:
            s = self.sites[0]
            return self._site_grads(s, (x2, masks, *params[s], za, zr, sums), blocks, aux_grads, need_x, flat)
        method, e, k, scale, cap, drop_scale, kernels, _ = self.scalars
        mine = [params[s] for s in self.sites]
        rank = mine[0][0].shape[0] // max(e, 1)
        if not backend.builds(x2, e, rank):  # (the forward, or another node, found a kernel that does not build)
            return self._backward_torch(x2, params, saved, blocks, aux_grads, need_x, flat)
        grad_outs = [grad_out_of(blocks[s], (x2, None, *params[s])) for s in self.sites]  # [T, O_s], maybe strided
        grad_aux = _stack_grads([aux_grads[s] for s in self.sites], ()) if sums.numel() else None  # [G]
        try:
            gx, *ps = _triton()[1](
                grad_outs, None, x2, masks, *zip(*mine, strict=True), za, zr, method, e, k, scale, cap,
                drop_scale, need_x, grad_aux, None if grad_aux is None else sums, wrap=False)
        except backend.build_errors() as exc:  # the torch path takes the forward's za / zr alike
            backend.unbuildable(exc, kernels, x2, e, rank)
            return self._backward_torch(x2, params, saved, blocks, aux_grads, need_x, flat)
        for j, s in enumerate(self.sites):
            a, b, g, tw, tb = mine[j]
            flat[_PARAMS * s: _PARAMS * (s + 1)] = [
                ps[0][j], ps[1][j], None if g is None else ps[2][j], None if tw is None else ps[3][j],
                None if tb is None else ps[4][j]]
        return gx if need_x else None

    def _backward_torch(self, x2: Tensor, params: list, saved: tuple, blocks: list, aux_grads: tuple, need_x: bool,
                        flat: list) -> Tensor | None:
        """`backward` of a Triton run on the torch path, site by site, from the Triton run's saved tensors (the
        same contract per site: `op.site_grads`)."""
        masks, za, zr, sums = saved
        gx = None
        for j, s in enumerate(self.sites):
            site = (x2, None if masks is None else masks[j], *params[s], za[j], zr[j],
                    sums[j] if sums.numel() else sums)
            g = self._site_grads(s, site, blocks, aux_grads, need_x, flat)
            gx = g if gx is None else gx.add_(g)  # [T, D] (None without need_x)
        return gx

    def _site_grads(self, s: int, site: tuple, blocks: list, aux_grads: tuple, need_x: bool,
                    flat: list) -> Tensor | None:
        """Site s's gradients on the torch path from its ten saved tensors (`op.site_grads`): its parameters'
        into `flat` -> its x gradient [T, D] (None without `need_x`)."""
        gx, *ps = site_grads(site, self.scalars, need_x, grad_out_of(blocks[s], site), None, aux_grads[s],
                             EAGER_BACKWARD[False])
        flat[_PARAMS * s: _PARAMS * (s + 1)] = ps
        return gx


_TRITON: tuple = ()


def _triton() -> tuple:
    """(adapter_triton_group, adapter_backward_triton_group), imported on first use (they import triton)."""
    global _TRITON
    if not _TRITON:
        from .adapter_triton import adapter_triton_group
        from .adapter_triton_bwd import adapter_backward_triton_group

        _TRITON = (adapter_triton_group, adapter_backward_triton_group)
    return _TRITON


def _into(block: Tensor, out: Tensor) -> None:
    """The up-projection is added into `block` in place whenever the dtypes agree, as here; else copied in."""
    if out is not block:
        block.copy_(out)


def _stack(masks: list[Tensor | None], x2: Tensor) -> Tensor | None:
    """G keep-masks [..., D] -> [G, T, D] (x2 [T, D]), or None when the sites do not drop: one site's viewed, and
    masks drawn in one tensor (`model.folding.drop_masks`: its slices in order) read from it, with no copy."""
    if masks[0] is None:
        return None
    if len(masks) == 1:
        return masks[0].reshape(1, *x2.shape)
    base, step = masks[0]._base, masks[0].numel()
    if (base is not None and base.numel() == step * len(masks) and base.is_contiguous()
            and all(m._base is base and m.data_ptr() == base.data_ptr() + j * step for j, m in enumerate(masks))):
        return base.view(len(masks), *x2.shape)
    return torch.stack([m.reshape(x2.shape) for m in masks])


def _stack_grads(grads: list[Tensor | None], shape: tuple) -> Tensor | None:
    """Per-site gradients of one output [*shape] (None: that site's output was not used) -> [G, *shape], zeros
    for the unused ones; None when none was used."""
    used = [g for g in grads if g is not None]
    if not used:
        return None
    if len(grads) == 1:
        return used[0].unsqueeze(0)
    return torch.stack([g if g is not None else used[0].new_zeros(shape) for g in grads])
