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

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .adapter_torch import as_dtype
from .op import _N_TENSORS, EAGER_BACKWARD, AdapterArgs, eager_triton, forward_on, grad_out_of, site_grads

_PER_SITE = 6  # the tensors each site passes (keep-mask, A, B, gate, threshold weight, threshold bias)

Projection = tuple[Sequence[AdapterArgs], Tensor, "Tensor | None"]  # (its sites in column order, W, b)


def adapter_linear(sites: Sequence[AdapterArgs], weight: Tensor, bias: Tensor | None) -> tuple[Tensor, list]:
    """y = F.linear(x, weight [O, D], bias [O]) + each site's adapter on its block of columns, in one autograd
    node. `sites`: the op's arguments of each site in column order (x [..., D] shared, base None); their B's rows
    add up to O. -> (y [..., O], per site (scores, mask, za, zr, aux, aux_sums) as the op returns them).

    Eager calls only; the caller checks that the fold applies (`AdaMoLELinear.folding_group`): not traced,
    weight and bias plain parameters that need no gradient, x and the adapters in the weight's dtype and device.
    """
    return adapter_linears([(sites, weight, bias)])[0]


def adapter_linears(projections: Sequence[Projection]) -> list[tuple[Tensor, list]]:
    """`adapter_linear` for several projections reading the same x, in one autograd node: one x gradient, the sum
    of all of theirs. -> per projection (y [..., O], per site its op outputs)."""
    meta = tuple((tuple(a.lora_b.shape[0] for a in sites), tuple(tuple(a)[_N_TENSORS:] for a in sites))
                 for sites, _, _ in projections)
    layers = [t for _, w, b in projections for t in (w, b)]
    flat = [t for sites, _, _ in projections for a in sites
            for t in (a.drop_mask, a.lora_a, a.lora_b, a.gate_w, a.thr_w, a.thr_b)]
    routing: list = []  # the forward puts each site's op outputs here
    out = _EagerLinearAdapter.apply(projections[0][0][0].x, meta, routing, *layers, *flat)
    n_p, res, i = len(meta), [], 0
    for p, (sizes, _) in enumerate(meta):
        sites = [(*o[:4], out[n_p + i + s], o[5]) for s, o in enumerate(routing[i:i + len(sizes)])]
        res.append((out[p], sites))  # (the aux losses as autograd returned them)
        i += len(sizes)
    return res


class _EagerLinearAdapter(torch.autograd.Function):
    """Inputs: x [..., D], meta (per projection: each site's columns O_s and its op scalars), `routing` (a list the
    forward fills with each site's six op outputs), each projection's W [O, D] and b [O] (or None), then
    each site's six tensors. Outputs (autograd's): each projection's y [..., O], then each site's aux loss (empty
    without one); the routing outputs (scores, mask, za, zr, aux_sums) are handed over in `routing`, outside
    autograd: on this path only the statistics read them (the scores get no gradient). Fewer outputs, less host
    time per call. Saves x, the W's, each site's five parameters and each run's tensors (`_Run`; the projections'
    own nodes saved x and W: W's version is checked)."""

    @staticmethod
    def forward(ctx, x, meta, routing, *tensors):
        n_p = len(meta)
        layers, flat = tensors[:2 * n_p], tensors[2 * n_p:]
        x2 = x.reshape(-1, x.shape[-1])  # [T, D]
        ys = [torch.nn.functional.linear(x, layers[2 * p], layers[2 * p + 1]) for p in range(n_p)]  # [..., O] each
        sites = _sites(meta, flat, [y.view(-1, y.shape[-1]) for y in ys], x2)
        runs = _runs(x2, sites)
        outs: list = [None] * len(sites)
        saved = [x2, *layers[::2], *(t for site in sites for t in site.params)]
        for run in runs:
            saved += run.forward(x2, sites, outs)
        ctx.x_shape, ctx.meta, ctx.runs, ctx.n_sites = x.shape, meta, runs, len(sites)
        ctx.save_for_backward(*saved)
        ctx.set_materialize_grads(False)
        auxes = [o[4] for o in outs]
        routing[:] = outs
        return (*ys, *auxes)

    @staticmethod
    def backward(ctx, *grads):
        saved, meta = ctx.saved_tensors, ctx.meta
        n_p, n_s = len(meta), ctx.n_sites
        x2, ws = saved[0], saved[1:1 + n_p]
        params = [saved[1 + n_p + _PARAMS * s: 1 + n_p + _PARAMS * (s + 1)] for s in range(n_s)]
        run_saved, i = saved[1 + n_p + _PARAMS * n_s:], 0
        g2s = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grads[:n_p]]  # [T, O] each
        blocks = [None if g2s[p] is None else g2s[p][:, c0:c0 + n] for p, c0, n, _ in _columns(meta)]
        need_x, gx, flat = ctx.needs_input_grad[0], None, [None] * (_PER_SITE * n_s)
        for run in ctx.runs:
            k = run.n_saved
            gxr = run.backward(x2, params, run_saved[i:i + k], blocks, grads[n_p:], need_x, flat)  # aux grads
            gx = gxr if gx is None else gx.add_(gxr)  # [T, D], ours
            i += k
        if gx is not None:
            for g2, w in zip(g2s, ws, strict=True):
                if g2 is not None:
                    gx.addmm_(as_dtype(g2, gx.dtype), w)  # + grad_y W: the projection's x gradient
        return (None if gx is None else gx.reshape(ctx.x_shape), None, None, *(None,) * (2 * n_p), *flat)


_PARAMS = 5  # the parameters each site saves (A, B, gate, threshold weight, threshold bias)


class _Site(NamedTuple):
    """One site in the node: its keep-mask [T, D] or None, its five parameters, its op scalars (method ... with_aux)
    and its columns of its projection's output, `block` [T, O_s]."""

    mask: Tensor | None
    params: tuple
    scalars: tuple
    block: Tensor


@functools.lru_cache(maxsize=256)
def _columns(meta: tuple) -> tuple[tuple[int, int, int, tuple], ...]:
    """(projection, first column, columns, op scalars) of every site, in order (a node's meta is the same call
    after call: worked out once)."""
    out = []
    for p, (sizes, scalars) in enumerate(meta):
        c0 = 0
        for n, sc in zip(sizes, scalars, strict=True):
            out.append((p, c0, n, sc))
            c0 += n
    return tuple(out)


def _sites(meta: tuple, flat: tuple, y2s: list, x2: Tensor) -> list[_Site]:
    """The node's sites from its inputs, each with its block of its projection's output y2 [T, O]."""
    sites = []
    for s, (p, c0, n, scalars) in enumerate(_columns(meta)):
        i = _PER_SITE * s
        mask = flat[i]
        mask = None if mask is None else mask.reshape(x2.shape)  # [T, D]
        sites.append(_Site(mask, flat[i + 1: i + _PER_SITE], scalars, y2s[p][:, c0:c0 + n]))
    return sites


def _runs(x2: Tensor, sites: list[_Site]) -> list[_Run]:
    """The sites in runs: those on the Triton path with the same op scalars, rank and dropout (or none) in one run
    of G sites (the kernels take them in one set of launches); each site on the torch path alone."""
    runs: dict = {}
    for s, site in enumerate(sites):
        method, e, k, scale, cap, drop_scale, kernels, with_aux = site.scalars
        triton = eager_triton(kernels, x2, e, site.params[0].shape[0])
        key = (method, e, k, scale, cap, drop_scale, with_aux, site.params[0].shape[0], site.mask is None,
               site.params[2] is None, site.params[3] is None) if triton else s
        runs.setdefault(key, _Run(triton, [])).sites.append(s)
    return list(runs.values())


class _Run:
    """Sites of the node computed together: G sites on the Triton path (`adapter_triton_group`, one set of
    launches), or one site on the torch path (`forward_on`, `site_grads`). `sites`: their indices in the node."""

    def __init__(self, triton: bool, sites: list[int]) -> None:
        self.triton, self.sites, self.n_saved, self.scalars = triton, sites, 0, ()

    def forward(self, x2: Tensor, sites: list[_Site], outs: list) -> list:
        """Add each site's up-projection into its block, put its six op outputs in `outs` -> the tensors to save."""
        mine = [sites[s] for s in self.sites]
        self.scalars = mine[0].scalars
        method, e, k, scale, cap, drop_scale, _, with_aux = self.scalars
        if self.triton:
            masks = _stack([site.mask for site in mine])  # [G, T, D] or None
            params = list(zip(*(site.params for site in mine), strict=True))  # per parameter, G tensors
            ys, scores, sel, za, zr, aux, sums = _triton()[0](
                x2, masks, *params, [site.block for site in mine], method, e, k, scale, cap, drop_scale, with_aux,
                wrap=False, own_base=True)
            for j, (s, site) in enumerate(zip(self.sites, mine, strict=True)):
                _into(site.block, ys[j])
                outs[s] = (scores[j], sel[j], za[j], zr[j], aux[j] if aux.numel() else aux,
                           sums[j] if sums.numel() else sums)
            saved = [masks, za, zr, sums]
        else:
            site = mine[0]
            out = forward_on(False, (x2, site.mask, *site.params, site.block, method, e, k, scale, cap, drop_scale,
                                     with_aux), own_base=True)
            _into(site.block, out[0])
            outs[self.sites[0]] = out[1:]
            saved = [site.mask, out[3], out[4], out[6]]
        self.n_saved = len(saved)
        return saved

    def backward(self, x2: Tensor, params: list, saved: tuple, blocks: list, aux_grads: tuple, need_x: bool,
                 flat: list) -> Tensor | None:
        """Each site's parameter gradients into `flat` (the node's inputs' order) -> the run's x gradient [T, D]
        (None without `need_x`). `params`: each site's five parameters; `blocks`: each site's columns of its
        projection's output gradient (or None); `aux_grads`: each site's aux loss's gradient (or None)."""
        masks, za, zr, sums = saved
        if not self.triton:
            s = self.sites[0]
            site = (x2, masks, *params[s], za, zr, sums)
            gx, *ps = site_grads(site, self.scalars, need_x, grad_out_of(blocks[s], site), None, aux_grads[s],
                                 EAGER_BACKWARD[False])
            flat[_PER_SITE * s + 1: _PER_SITE * (s + 1)] = ps
            return gx
        method, e, k, scale, cap, drop_scale, _, _ = self.scalars
        mine = [params[s] for s in self.sites]
        grad_outs = [grad_out_of(blocks[s], (x2, None, *params[s])).contiguous() for s in self.sites]  # [T, O_s]
        grad_aux = _stack_grads([aux_grads[s] for s in self.sites], ()) if sums.numel() else None  # [G]
        gx, *ps = _triton()[1](
            grad_outs, None, x2, masks, *zip(*mine, strict=True), za, zr, method, e, k, scale, cap,
            drop_scale, need_x, grad_aux, None if grad_aux is None else sums, wrap=False)
        for j, s in enumerate(self.sites):
            a, b, g, tw, tb = mine[j]
            flat[_PER_SITE * s + 1: _PER_SITE * (s + 1)] = [
                ps[0][j], ps[1][j], None if g is None else ps[2][j], None if tw is None else ps[3][j],
                None if tb is None else ps[4][j]]
        return gx if need_x else None


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


def _stack(masks: list[Tensor | None]) -> Tensor | None:
    """G keep-masks [T, D] -> [G, T, D], or None when the sites do not drop: one site's viewed, and masks drawn in
    one tensor (`model.modules.drop_masks`: its slices in order) read from it, with no copy."""
    if masks[0] is None:
        return None
    if len(masks) == 1:
        return masks[0].unsqueeze(0)
    base, step = masks[0]._base, masks[0].numel()
    if (base is not None and base.numel() == step * len(masks) and base.is_contiguous()
            and all(m._base is base and m.data_ptr() == base.data_ptr() + j * step for j, m in enumerate(masks))):
        return base.view(len(masks), *masks[0].shape)
    return torch.stack(masks)


def _stack_grads(grads: list[Tensor | None], shape: tuple) -> Tensor | None:
    """Per-site gradients of one output [*shape] (None: that site's output was not used) -> [G, *shape], zeros
    for the unused ones; None when none was used."""
    used = [g for g in grads if g is not None]
    if not used:
        return None
    if len(grads) == 1:
        return used[0].unsqueeze(0)
    return torch.stack([g if g is not None else used[0].new_zeros(shape) for g in grads])
