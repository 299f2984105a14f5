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

from collections.abc import Sequence

import torch
from torch import Tensor

from .adapter_torch import as_dtype
from .op import _N_TENSORS, EAGER_BACKWARD, AdapterArgs, eager_triton, forward_on, grad_out_of, site_grads

_PER_SITE = 6  # the tensors each site passes (keep-mask, A, B, gate, threshold weight, threshold bias)
_OUTS = 6  # the outputs each site returns (scores, mask, za, zr, aux, aux_sums)
_SAVED = 9  # the tensors saved per site: its six inputs, then za, zr and aux_sums

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
    out = _EagerLinearAdapter.apply(projections[0][0][0].x, meta, *layers, *flat)
    n_p, res, i = len(projections), [], 0
    for p, (sizes, _) in enumerate(meta):
        res.append((out[p], [out[n_p + _OUTS * (i + s): n_p + _OUTS * (i + s + 1)] for s in range(len(sizes))]))
        i += len(sizes)
    return res


class _EagerLinearAdapter(torch.autograd.Function):
    """Inputs: x [..., D], meta (per projection: each site's columns O_s and its op scalars), each projection's
    W [O, D] and b [O] (or None), then each site's six tensors. Outputs: each projection's y [..., O], then each
    site's six op outputs (routing per token, [T, ...]). Saves x, the W's and each site's tensors (the
    projections' own nodes saved x and W: W's version is checked)."""

    @staticmethod
    def forward(ctx, x, meta, *tensors):
        n_p = len(meta)
        layers, flat = tensors[:2 * n_p], tensors[2 * n_p:]
        x2 = x.reshape(-1, x.shape[-1])  # [T, D]
        ctx.x_shape, ctx.meta, ctx.triton = x.shape, meta, []
        ys, saved, outs, constant, s = [], [x2, *layers[::2]], [], [], 0
        for p, (sizes, scalars) in enumerate(meta):
            y = torch.nn.functional.linear(x, layers[2 * p], layers[2 * p + 1])  # [..., O]
            y2, c0 = y.view(-1, y.shape[-1]), 0  # [T, O]
            for n, sc in zip(sizes, scalars, strict=True):
                site = flat[_PER_SITE * s: _PER_SITE * (s + 1)]
                out = _site_forward(ctx, x2, site, y2[:, c0:c0 + n], sc)  # into this site's columns of y
                saved += [*out[0], out[1][2], out[1][3], out[1][5]]
                outs += out[1]
                constant += [out[1][1], out[1][2], out[1][3], out[1][5]]
                c0, s = c0 + n, s + 1
            ys.append(y)
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(*constant)
        ctx.set_materialize_grads(False)
        return (*ys, *outs)

    @staticmethod
    def backward(ctx, *grads):
        saved, meta = ctx.saved_tensors, ctx.meta
        n_p = len(meta)
        x2, ws, site_saved = saved[0], saved[1:1 + n_p], saved[1 + n_p:]
        need_x, grad_ys, grads = ctx.needs_input_grad[0], grads[:n_p], grads[n_p:]
        gx, flat, s = None, [], 0
        g2s = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grad_ys]  # [T, O] each
        for (sizes, scalars), g2 in zip(meta, g2s, strict=True):
            c0 = 0
            for n, sc in zip(sizes, scalars, strict=True):
                site = (x2, *site_saved[_SAVED * s: _SAVED * (s + 1)])
                go = grad_out_of(None if g2 is None else g2[:, c0:c0 + n], site)  # [T, O_s]
                gxs, *params = site_grads(site, sc, need_x, go, grads[_OUTS * s], grads[_OUTS * s + 4],
                                          EAGER_BACKWARD[ctx.triton[s]])
                gx = gxs if gx is None else gx.add_(gxs)  # [T, D], ours
                flat += [None, *params]
                c0, s = c0 + n, s + 1
        if gx is not None:
            for g2, w in zip(g2s, ws, strict=True):
                if g2 is not None:
                    gx.addmm_(as_dtype(g2, gx.dtype), w)  # + grad_y W: the projection's x gradient
        return (None if gx is None else gx.reshape(ctx.x_shape), None, *(None,) * (2 * n_p), *flat)


def _site_forward(ctx, x2: Tensor, site: tuple, block: Tensor, scalars: tuple) -> tuple[list, tuple]:
    """One site's op on x2 [T, D] added into `block` [T, O_s] (its columns of y, in place) -> (its six input
    tensors as saved, keep-mask [T, D]; its op outputs (scores, mask, za, zr, aux, aux_sums))."""
    mask, a, bb, g, tw, tb = site
    mask = None if mask is None else mask.reshape(x2.shape)  # [T, D]
    method, e, k, scale, cap, drop_scale, kernels, with_aux = scalars
    triton = eager_triton(kernels, x2, e, a.shape[0])
    out = forward_on(triton, (x2, mask, a, bb, g, tw, tb, block, method, e, k, scale, cap, drop_scale, with_aux),
                     wrap=False, own_base=True)
    if out[0] is not block:  # the up-projection is added in place whenever the dtypes agree, as here
        block.copy_(out[0])
    ctx.triton.append(triton)
    return [mask, a, bb, g, tw, tb], out[1:]
