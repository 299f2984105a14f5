"""nn.MultiheadAttention with adapted projections: `AdaMoLEMultiheadAttention` takes its place, keeping it whole
and unchanged as `.base_layer`, and computes its forward as torch's `F.multi_head_attention_forward` does, with
q, k, v and the output computed through the adapted projections.

Why a rewrite of the call: nn.MultiheadAttention reads `in_proj_weight` (or `q/k/v_proj_weight`) and
`out_proj.weight` itself, so a module swapped in for `out_proj` never runs, and the in-projection is no module
at all. PEFT merges its LoRA delta into the weights for the forward, which works for a delta that does not depend
on the input; routed experts do, so the projections must be computed as projections.

Supported, as torch computes them: batch_first or not, unbatched inputs, `attn_mask` (2-D / 3-D, bool or
float), `key_padding_mask`, `is_causal`, `need_weights` with `average_attn_weights`, attention dropout in
training, a packed `in_proj_weight` (self-attention: one fused projection, its q, k, v thirds adapted like
GPT-2's `c_attn`; cross-attention: each third on its own input) or separate `q/k/v_proj_weight` (kdim, vdim).
Refused by name (`check_supported`): `add_bias_kv`, `add_zero_attn`, subclasses (their forward may differ).
The projections run on batch-first views, so `batch_adapters` rows are the batch's rows.

Names: each adapted projection keeps its base model name (`<mha>.in_proj_weight`, `<mha>.q_proj_weight`, ...,
`<mha>.out_proj`), its adapters live in `<mha>.adapted.<name>`; the MultiheadAttention's own parameters move
under `<mha>.base_layer.` (`model/state.key_prefixes` maps both ways). While a model holds one of these, torch's
MultiheadAttention fast path is off (a row of `integrations/patches.py`): TransformerEncoderLayer and
TransformerEncoder read the attention's weights in it and would bypass this forward.

Legend: L target length, S source length, N batch, E embed_dim, H heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .projection import ProjectionAdapters, Swapped

IN_PROJ = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
OUT_PROJ = "out_proj"
ROLES = ("q", "k", "v")
# nn.MultiheadAttention's attributes its callers read (TransformerEncoderLayer, TransformerEncoder, user code)
ATTRS = ("embed_dim", "kdim", "vdim", "num_heads", "head_dim", "dropout", "batch_first", "_qkv_same_embed_dim",
         "in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight", "bias_k", "bias_v",
         "add_zero_attn", "out_proj", "merge_masks")


class UnsupportedAttention(TypeError):
    """An nn.MultiheadAttention with an option the rewrite does not compute."""


def check_supported(mha: nn.Module, name: str) -> None:
    """Raise `UnsupportedAttention` naming what `mha` (at `name`) uses that the rewrite does not compute."""
    if type(mha) is not nn.MultiheadAttention:
        raise UnsupportedAttention(f"cannot adapt {name}: a {type(mha).__name__}, a subclass of "
                                   "nn.MultiheadAttention whose forward may differ from torch's")
    why = [w for w, on in (("add_bias_kv=True", mha.bias_k is not None or mha.bias_v is not None),
                           ("add_zero_attn=True", mha.add_zero_attn)) if on]
    if why:
        raise UnsupportedAttention(f"cannot adapt {name}: nn.MultiheadAttention({', '.join(why)}) is not supported "
                                   "(only the projections are rewritten); exclude it with AdaMoLEConfig(exclude=...)")


def weight_of(mha: nn.MultiheadAttention, name: str) -> Tensor:
    """The weight of projection `name` (an `IN_PROJ` parameter or `out_proj`)."""
    return mha.out_proj.weight if name == OUT_PROJ else getattr(mha, name)


class AdaMoLEMultiheadAttention(Swapped):
    """An nn.MultiheadAttention (`.base_layer`, unchanged) whose projections are adapted (`.adapted`, a holder
    per projection, named as in the base model)."""

    OWN = ("base_layer.", "adapted.")

    def __init__(self, base_layer: nn.MultiheadAttention, name: str = "") -> None:
        check_supported(base_layer, name or "the attention")
        super().__init__()
        self.base_layer = base_layer
        self.adapted = nn.ModuleDict()
        self.train(base_layer.training)

    def holders(self) -> dict[str, ProjectionAdapters]:
        """The adapted projections, by their names in the base model."""
        return dict(self.adapted.items())

    def holder_path(self, name: str) -> str:
        """`adapted.<name>`."""
        return f"adapted.{name}"

    def prune(self) -> bool:
        """Drop holders left with no adapter; -> is none left?"""
        for name in [n for n, h in self.adapted.items() if not h.adapters]:
            del self.adapted[name]
        return not self.adapted

    def extra_repr(self) -> str:
        """The adapted projections, for `repr`."""
        return f"adapted={list(self.adapted)}"

    # ---- the forward: torch's F.multi_head_attention_forward, the projections adapted ----------------------
    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """As nn.MultiheadAttention.forward (its slow path: the fast path would read the weights itself)."""
        mha = self.base_layer
        if query.is_nested or key.is_nested or value.is_nested:
            raise AssertionError("MultiheadAttention does not support NestedTensor outside of its fast path, "
                                 "which an adapted one does not take")
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        batch_first = mha.batch_first and query.dim() == 3
        if batch_first:  # torch's layout [L, N, E], identities kept (they pick the projection path)
            query, key, value = _each((query, key, value), lambda t: t.transpose(1, 0))
        out, weights = self._attend(query, key, value, key_padding_mask, need_weights, attn_mask,
                                    average_attn_weights, is_causal)
        return (out.transpose(1, 0) if batch_first else out), weights

    def _attend(self, query, key, value, key_padding_mask, need_weights, attn_mask, average, is_causal):
        mha, heads = self.base_layer, self.base_layer.num_heads
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, heads)
        if not is_batched:
            query, key, value = _each((query, key, value), lambda t: t.unsqueeze(1))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False
        q, k, v = self._in_projection(query, key, value)  # each [L or S, N, E], contiguous
        hd = embed_dim // heads
        attn_mask = _batched_mask(attn_mask, tgt_len, key.shape[0], bsz * heads)
        q = q.view(tgt_len, bsz * heads, hd).transpose(0, 1)
        k = k.view(k.shape[0], bsz * heads, hd).transpose(0, 1)
        v = v.view(v.shape[0], bsz * heads, hd).transpose(0, 1)
        src_len = k.size(1)
        if key_padding_mask is not None:
            F._check_key_padding_mask(key_padding_mask, src_len, bsz)
            kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        dropout_p = mha.dropout if self.training else 0.0
        if need_weights:
            out, weights = _with_weights(q, k, v, attn_mask, dropout_p, is_causal, bsz)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            weights = weights.mean(dim=1) if average else weights
        else:
            if attn_mask is not None:
                attn_mask = attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 and attn_mask.dim() == 3 else \
                    attn_mask.view(bsz, heads, -1, src_len)
            q, k, v = (t.view(bsz, heads, t.shape[1], hd) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
            out, weights = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim), None
        out = self._out(out.view(tgt_len, bsz, embed_dim))
        if not is_batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    # ---- the projections, on batch-first views [N, T, .] (a batch_adapters row is a batch row) ----------------
    def _project(self, name: str, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """x [T, N, D] -> linear(x, w, b) [T, N, O] plus projection `name`'s adapters, contiguous."""
        xb = x.transpose(0, 1)
        y = F.linear(xb, w, b)
        if name in self.adapted:
            y = self.adapted[name].add_to(xb, y)
        return y.transpose(0, 1).contiguous()

    def _role(self, role: str, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """x [T, N, E] -> role's third of the packed in-projection [T, N, E], its adapter added."""
        xb = x.transpose(0, 1)
        y = F.linear(xb, w, b)
        if "in_proj_weight" in self.adapted:
            y = self.adapted["in_proj_weight"].add_role(role, xb, y)
        return y.transpose(0, 1).contiguous()

    def _in_projection(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """torch's `_in_projection_packed` / `_in_projection`, each projection adapted."""
        mha = self.base_layer
        biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
        if not mha._qkv_same_embed_dim:
            return tuple(self._project(name, x, getattr(mha, name), b)
                         for name, x, b in zip(IN_PROJ[1:], (q, k, v), biases, strict=True))
        w, e = mha.in_proj_weight, q.size(-1)
        if q is k and k is v:  # self-attention: one fused projection (GPT-2's c_attn)
            proj = self._project("in_proj_weight", q, w, mha.in_proj_bias)  # [L, N, 3E]
            proj = proj.unflatten(-1, (3, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return proj[0], proj[1], proj[2]
        ws = w.chunk(3)
        return tuple(self._role(role, x, wi, b) for role, x, wi, b in zip(ROLES, (q, k, v), ws, biases, strict=True))

    def _out(self, out: Tensor) -> Tensor:
        """out [L, N, E] -> the output projection [L, N, E], adapted."""
        proj = self.base_layer.out_proj
        return self._project(OUT_PROJ, out, proj.weight, proj.bias)


def _each(tensors: tuple[Tensor, ...], fn) -> tuple[Tensor, ...]:
    """fn of each tensor, once per distinct tensor: `query is key` stays true."""
    done: dict[int, Tensor] = {}
    return tuple(done.setdefault(id(t), fn(t)) if id(t) not in done else done[id(t)] for t in tensors)


def _batched_mask(mask: Tensor | None, tgt_len: int, src_len: int, batch_heads: int) -> Tensor | None:
    """A 2-D [L, S] mask as [1, L, S]; a 3-D one must be [N*H, L, S] (torch's checks)."""
    if mask is None:
        return None
    if mask.dim() == 2:
        if mask.shape != (tgt_len, src_len):
            raise RuntimeError(f"The shape of the 2D attn_mask is {mask.shape}, but should be {(tgt_len, src_len)}.")
        return mask.unsqueeze(0)
    if mask.dim() == 3:
        if mask.shape != (batch_heads, tgt_len, src_len):
            raise RuntimeError(f"The shape of the 3D attn_mask is {mask.shape}, but should be "
                               f"{(batch_heads, tgt_len, src_len)}.")
        return mask
    raise RuntimeError(f"attn_mask's dimension {mask.dim()} is not supported")


def _with_weights(q, k, v, attn_mask, dropout_p, is_causal, bsz) -> tuple[Tensor, Tensor]:
    """torch's need_weights branch: q, k, v [N*H, L or S, hd] -> (out [L*N, E], weights [N*H, L, S])."""
    if is_causal and attn_mask is None:
        raise AssertionError("FIXME: is_causal not implemented for need_weights")
    q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
    kt = k.transpose(-2, -1)
    scores = torch.baddbmm(attn_mask, q_scaled, kt) if attn_mask is not None else torch.bmm(q_scaled, kt)
    weights = F.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    out = torch.bmm(weights, v)  # [N*H, L, hd]
    tgt_len, heads = out.shape[1], out.shape[0] // bsz
    return out.transpose(0, 1).reshape(tgt_len * bsz, heads * out.shape[2]), weights


def _attrs(cls: type) -> type:
    """nn.MultiheadAttention's attributes on `cls`, read from the base layer."""
    for attr in ATTRS:
        setattr(cls, attr, property(lambda self, a=attr: getattr(self.base_layer, a),
                                    doc=f"The base nn.MultiheadAttention's `{attr}`."))
    return cls


_attrs(AdaMoLEMultiheadAttention)
