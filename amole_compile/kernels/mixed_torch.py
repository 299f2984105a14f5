"""Mixed batches: each row of a batch runs its own adapter (or none), in one gathered computation.

The adapters of one site (one role of one projection) are stacked into padded tensors, one slot per adapter
plus a last all-zero slot for rows that run no adapter. Each row gathers its slot's weights and runs a batched
GEMM, so a batch spread over several adapters costs one pass, not one per adapter, and has no data-dependent
shape: `torch.compile` and `torch.export` (hence ONNX, with an `adapter_ids` input) take it as it is.

Adapters of different sizes and methods share a stack: experts are padded to the largest E (padded experts get
a -inf gate logit, so weight 0 and never selected), ranks to the largest R (zero rows of A, zero columns of B),
and the routing of each method in the stack is `routing_torch`'s per-method routing with per-row constants,
picked per row by its method code. The math per row is `adapter_torch`'s (docs/math.md); plain torch ops,
autograd by torch.

Legend: B rows, S tokens per row, D in, O out, L adapters (slots 0..L-1, slot L = none), E = max experts,
R = max rank, K = E * R.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from .methods import ADAMOLE, LORA, MOLE, method_spec
from .routing_torch import method_routing


class SiteWeights(NamedTuple):
    """One adapter's site, as `ExpertSet` holds it."""

    lora_a: Tensor  # [E_a * R_a, D]
    lora_b: Tensor  # [O, E_a * R_a]
    gate: Tensor | None  # [E_a, D]
    thr_w: Tensor | None  # [1, D]
    thr_b: Tensor | None  # [1]
    method: str
    num_experts: int
    top_k: int
    scale: float
    cap: float
    dropout: float


class Stack(NamedTuple):
    """L adapters of one site, padded and stacked, plus the all-zero slot L."""

    down: Tensor  # [L+1, K + E + 1, D]: A (K rows), the gate (E rows, zero-padded), the threshold row
    lora_b: Tensor  # [L+1, O, K]
    up: Tensor  # [O, (L+1) * K]: lora_b with the slots side by side (the all-slots form, see `mixed_adapter`)
    meta: Tensor  # [L+1, 7] float64: experts, method code, cap, top_k, scale, dropout, threshold bias
    experts: int  # E
    max_k: int  # largest top_k of a mole slot (0 when none)
    methods: frozenset  # the method names of the adapters' slots (the empty slot's routing never matters: B = 0)


COL_EXPERTS, COL_CODE, COL_CAP, COL_TOP_K, COL_SCALE, COL_DROPOUT, COL_THR_B = range(7)  # `Stack.meta` columns


def stack_sites(sites: list[SiteWeights]) -> Stack:
    """Pad and stack the sites (same D and O) -> `Stack`; differentiable in the weights."""
    ref = sites[0].lora_a
    e = max([s.num_experts for s in sites])
    r = max([s.lora_a.shape[0] // s.num_experts for s in sites])
    d, o = ref.shape[1], sites[0].lora_b.shape[0]
    down, b_parts = [], []
    for s in sites:
        ea, ra = s.num_experts, s.lora_a.shape[0] // s.num_experts
        a = F.pad(s.lora_a.view(ea, ra, d), (0, 0, 0, r - ra, 0, e - ea))  # [E, R, D]
        b = F.pad(s.lora_b.view(o, ea, ra), (0, r - ra, 0, e - ea))  # [O, E, R]
        gate = s.gate if s.gate is not None else ref.new_zeros(ea, d)
        thr = s.thr_w if s.thr_w is not None else ref.new_zeros(1, d)
        down.append(torch.cat([a.reshape(e * r, d), F.pad(gate, (0, 0, 0, e - ea)), thr], 0))  # [K+E+1, D]
        b_parts.append(b.reshape(o, e * r))
    down.append(ref.new_zeros(e * r + e + 1, d))
    b_parts.append(ref.new_zeros(o, e * r))
    consts = [[s.num_experts, method_spec(s.method).code, s.cap, s.top_k, s.scale, s.dropout] for s in sites]
    consts.append([1, LORA.code, 0.0, 1, 0.0, 0.0])
    dev = ref.device
    f64 = dict(dtype=torch.float64, device=dev)
    thr_b = [s.thr_b.reshape(()).double() if s.thr_b is not None else torch.zeros((), **f64) for s in sites]
    meta = torch.cat([torch.tensor(consts, **f64), torch.stack(thr_b + [torch.zeros((), **f64)])[:, None]], 1)
    return Stack(torch.stack(down), torch.stack(b_parts), torch.cat(b_parts, 1), meta, e,
                 max([s.top_k for s in sites if s.method == MOLE.name] or [0]), frozenset(s.method for s in sites))


def _route(zr: Tensor, meta: Tensor, st: Stack) -> tuple[Tensor, Tensor, Tensor]:
    """zr [B, S, E+1] float32, meta [B, 7] (the rows' slots) -> (w, scores, mask), each [B, S, E]: each method of
    the stack routed by `routing_torch.method_routing` with the rows' constants ([B, 1, 1], broadcast over S),
    then picked per row by its slot's method code."""
    e = st.experts
    valid = (torch.arange(e, device=zr.device) < meta[:, COL_EXPERTS, None])[:, None, :]  # [B, 1, E]
    logits = zr[..., :e].masked_fill(~valid, float("-inf"))  # [B, S, E]: padded experts never win
    # torch.softmax, not routing_torch's CPU form: torch.export traces this path into the multi-adapter ONNX
    # graph, where it stays one Softmax node
    p = torch.softmax(logits, dim=-1)  # [B, S, E]
    codes = sorted(method_spec(m).code for m in st.methods)
    u = zr[..., e:] + meta[:, COL_THR_B, None, None] if ADAMOLE.code in codes else None  # [B, S, 1]
    routes = [method_routing(c, p, logits, u, meta[:, COL_CAP, None, None], meta[:, COL_TOP_K, None, None],
                             st.max_k, valid) for c in codes]
    # the last method's routing is the default: its rows' and the empty slot's (which adds 0 whatever it routes);
    # a stack of one method routes with that method alone
    w, scores, mask = routes[-1][:3]
    code = meta[:, COL_CODE, None, None]  # [B, 1, 1]
    for c, r in zip(codes[:-1], routes[:-1], strict=True):
        here = code == c  # [B, 1, 1]
        w, scores, mask = (torch.where(here, r.w, w), torch.where(here, r.scores, scores),
                           torch.where(here, r.mask, mask))
    return w, scores, mask


def mixed_adapter(x: Tensor, slot: Tensor, st: Stack, drop_mask: Tensor | None = None,
                  all_slots: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """x [B, S, D], slot [B] (0..L, L = no adapter) -> (delta [B, S, O], scores [B, S, E], mask [B, S, E] bool).

    Row b computes what its slot's adapter alone computes on it (its dropout keep-mask from `drop_mask`
    [B, S, D] when training). Two exact forms: each row gathers its slot's weights (the default: work per
    token is one adapter's), or, `all_slots` (no dropout), every token runs against all slots' weights side by
    side and keeps its own slot's columns: L+1 times the arithmetic but no per-row copy of the weights, which
    is cheaper when a row has few tokens (one decoding step)."""
    b, s, _ = x.shape
    e, k = st.experts, st.lora_b.shape[2]
    route_dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    meta = st.meta[slot].to(route_dt)  # [B, 7], in the routing's dtype (as the single-adapter path rounds them)
    one_gemm = drop_mask is None and x.dtype == route_dt  # half dtypes: the router in float32, apart
    if all_slots and one_gemm:
        za, zr = _all_slots_down(x, slot, st).split([k, e + 1], dim=-1)
    elif one_gemm:
        down = st.down[slot]  # [B, K+E+1, D]: one gather for A and the router
        za, zr = torch.bmm(x, down.transpose(1, 2)).split([k, e + 1], dim=-1)  # [B, S, K], [B, S, E+1]
    else:
        down = st.down[slot]
        xd = x
        if drop_mask is not None:
            keep = 1.0 / (1.0 - meta[:, COL_DROPOUT]).to(x.dtype)  # [B]
            xd = torch.where(drop_mask, x, 0) * keep[:, None, None]
        za = torch.bmm(xd, down[:, :k].transpose(1, 2))
        zr = torch.bmm(x.to(route_dt), down[:, k:].to(route_dt).transpose(1, 2))  # float32 whatever x's dtype
    w, scores, mask = _route(zr.to(route_dt), meta, st)
    h = za.reshape(b, s, e, k // e) * (meta[:, COL_SCALE, None, None].to(w.dtype) * w).to(za.dtype)[..., None]
    h = h.reshape(b, s, k)
    if all_slots and one_gemm:
        return _all_slots_up(h, slot, st), scores, mask
    return torch.bmm(h, st.lora_b[slot].transpose(1, 2)), scores, mask  # [B, S, O]


def _all_slots_down(x: Tensor, slot: Tensor, st: Stack) -> Tensor:
    """x [B, S, D] against every slot's [A; router] at once, each row keeping its slot's -> [B, S, K+E+1]."""
    b, s, d = x.shape
    n, rows = st.down.shape[:2]
    z = (x.reshape(b * s, d) @ st.down.reshape(n * rows, d).t()).view(b, s, n, rows)  # [B, S, L+1, K+E+1]
    return z.gather(2, slot.view(b, 1, 1, 1).expand(b, s, 1, rows)).squeeze(2)


def _all_slots_up(h: Tensor, slot: Tensor, st: Stack) -> Tensor:
    """h [B, S, K] in its slot's block of zeros [B, S, (L+1) K], times all slots' B side by side -> [B, S, O]."""
    b, s, k = h.shape
    n = st.down.shape[0]
    full = h.new_zeros(b, s, n, k).scatter(2, slot.view(b, 1, 1, 1).expand(b, s, 1, k), h[:, :, None, :])
    return (full.view(b * s, n * k) @ st.up.t()).view(b, s, -1)
