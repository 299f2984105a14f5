"""The adapter op with a frozen projection folded in, for eager calls: `adapter_linear`.

One autograd node computes y = F.linear(x, W, b) and adds each site's adapter into its block of y's columns in
place (`addmm_`, Unsloth's `matmul_lora`). The sites are those of one projection, whose roles own contiguous
column blocks in role order: one site for an unfused projection, q | k | v or gate | up for a fused one. Its
backward sums the sites' x gradients into the first and adds grad_y W into it in place (`addmm_`).

Unfolded, the projection's own node and each site's node gave autograd S + 1 x gradients [T, D] to sum, and a
fused projection's deltas were concatenated and added to y: on a GPU, launches and whole [T, D] / [T, O] passes
over memory per site. Same forward and backward per site as `op._EagerAdapter` (`op.forward_on`,
`op.site_grads`): the routing outputs and parameter gradients are the unfolded path's bit for bit, and so is a
single site's output. A fused projection's output and x's gradient are rounded once per sum instead of per add.

Legend: T tokens (x's leading dims flattened), D in features, O out features, O_s a site's columns, S sites.
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


def adapter_linear(sites: Sequence[AdapterArgs], weight: Tensor, bias: Tensor | None) -> tuple[Tensor, list]:
    """y = F.linear(x, weight [O, D], bias [O]) + each site's adapter on its block of columns, in one autograd
    node. `sites`: the op's arguments of each site in column order (x [..., D] shared, base None); their B's rows
    add up to O. -> (y [..., O], per site (scores, mask, za, zr, aux, aux_sums) as the op returns them).

    Eager calls only; the caller checks that the fold applies (`AdaMoLELinear.folding_group`): not traced,
    weight and bias plain parameters that need no gradient, x and the adapters in the weight's dtype and device.
    """
    meta = (tuple(a.lora_b.shape[0] for a in sites), tuple(tuple(a)[_N_TENSORS:] for a in sites))
    flat = [t for a in sites for t in (a.drop_mask, a.lora_a, a.lora_b, a.gate_w, a.thr_w, a.thr_b)]
    out = _EagerLinearAdapter.apply(sites[0].x, weight, bias, meta, *flat)
    return out[0], [out[1 + _OUTS * s: 1 + _OUTS * (s + 1)] for s in range(len(sites))]


class _EagerLinearAdapter(torch.autograd.Function):
    """Inputs: x [..., D], W [O, D], b [O] or None, meta (each site's columns O_s, and its op scalars), then
    each site's six tensors. Outputs: y [..., O], then each site's six op outputs (routing per token, [T, ...]).
    Saves x, W and each site's tensors (the projection's own node saved x and W: W's version is checked)."""

    @staticmethod
    def forward(ctx, x, w, b, meta, *flat):
        sizes, scalars = meta
        y = torch.nn.functional.linear(x, w, b)  # [..., O]
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])  # [T, D], [T, O]
        ctx.x_shape, ctx.meta, ctx.triton = x.shape, meta, []
        saved, outs, constant, c0 = [x2, w], [y], [], 0
        for s, n in enumerate(sizes):
            mask, a, bb, g, tw, tb = flat[_PER_SITE * s: _PER_SITE * (s + 1)]
            mask = None if mask is None else mask.reshape(x2.shape)  # [T, D]
            method, e, k, scale, cap, drop_scale, kernels, with_aux = scalars[s]
            triton = eager_triton(kernels, x2, e, a.shape[0])
            block = y2[:, c0:c0 + n]  # [T, O_s] this site's columns of y
            out = forward_on(triton, (x2, mask, a, bb, g, tw, tb, block, method, e, k, scale, cap, drop_scale,
                                      with_aux), wrap=False, own_base=True)
            if out[0] is not block:  # the up-projection is added in place whenever the dtypes agree, as here
                block.copy_(out[0])
            ctx.triton.append(triton)
            saved += [mask, a, bb, g, tw, tb, out[3], out[4], out[6]]
            outs += out[1:]
            constant += [out[2], out[3], out[4], out[6]]
            c0 += n
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(*constant)
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_y, *grads):
        saved = ctx.saved_tensors
        x2, w = saved[0], saved[1]
        sizes, scalars = ctx.meta
        need_x = ctx.needs_input_grad[0]
        g2 = None if grad_y is None else grad_y.reshape(-1, grad_y.shape[-1])  # [T, O]
        gx, flat, c0 = None, [], 0
        for s, n in enumerate(sizes):
            site = (x2, *saved[2 + _SAVED * s: 2 + _SAVED * (s + 1)])
            go = grad_out_of(None if g2 is None else g2[:, c0:c0 + n], site)  # [T, O_s]
            gxs, *params = site_grads(site, scalars[s], need_x, go, grads[_OUTS * s], grads[_OUTS * s + 4],
                                      EAGER_BACKWARD[ctx.triton[s]])
            gx = gxs if gx is None else gx.add_(gxs)  # [T, D], ours
            flat += [None, *params]
            c0 += n
        if gx is not None and g2 is not None:
            gx.addmm_(as_dtype(g2, gx.dtype), w)  # + grad_y W: the projection's x gradient
        return (None if gx is None else gx.reshape(ctx.x_shape), None, None, None, *flat)
