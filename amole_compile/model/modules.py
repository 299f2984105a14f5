"""Adapter modules: `ExpertSet` (one site: a role's experts and router) and `AdapterGroup` (one named adapter on
one projection: a site per role, each writing its columns). `projection.py` holds the modules that replace a
projection.

Legend: T tokens, D in_features, O out_features (of the role), E experts, R rank, K = E * R.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from ..config import AdaMoLEConfig
from ..kernels import AdapterArgs, adapter, register
from ..kernels.adapter_torch import as_dtype
from ..kernels.mixed_torch import SiteWeights
from .columns import column_gather, combine_deltas
from .folding import add_linears
from .records import Records


def linear_features(layer: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) for the layer types we can adapt, else None."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    w = getattr(layer, "weight", None)
    if type(layer).__name__ == "Conv1D" and isinstance(w, Tensor) and w.ndim == 2 and hasattr(layer, "nf"):
        return w.shape[0], w.shape[1]  # GPT-2 Conv1D: y = x W + b with W [D, O]
    return None


def keep_mask(x: Tensor, p: float | Tensor, one_launch: bool = False) -> Tensor:
    """A bool dropout keep-mask shaped like x: each element kept with probability 1 - p (p a float, or a tensor
    that broadcasts against x). Never drawn in x's dtype: a bf16 or fp16 draw would quantise p to its few
    mantissa bits (0.05 becomes 13/256 in bf16).
    `one_launch` (a float p): `bernoulli_` straight into a bool tensor, one kernel on a GPU (float32 uniforms),
    where float32 uniforms >= p take two launches and a [T, D] float32 temporary; on CPU, where launches cost
    nothing, the uniforms are 1.5-2x faster, so the torch path (CPU) draws them."""
    if one_launch and isinstance(p, float):
        return torch.empty(x.shape, device=x.device, dtype=torch.bool).bernoulli_(1.0 - p)
    return torch.rand(x.shape, device=x.device, dtype=torch.float32) >= p


def autocast_on(device_type: str) -> bool:
    """Is autocast enabled for `device_type`? False for a device type autocast does not exist for (meta, where
    `torch.is_autocast_enabled` raises): a model moved to the meta device runs for shapes and FLOP counts."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def no_autocast(device_type: str):
    """A context that turns autocast off for `device_type`: a null context where it is off already, or where
    there is none (meta). (An unneeded `torch.autocast` region is a `wrap_with_autocast` subgraph in
    torch.export's graph: a 4-adapter, 1-layer export's capture took 10.1 s with it, 8.8 s without.)"""
    if autocast_on(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class ExpertSet(Records, nn.Module):
    """One AdaMoLE site: E LoRA experts stacked (A [K, D], B [O, K]), a softmax gate [E, D] and a threshold net
    ([1, D] weight, [1] bias). MoLE has no threshold net and LoRA has neither router part.

    Dropout draws one mask per site, shared by all its experts (the upstream code draws one per expert); the gate
    and threshold see the undropped input. In training mode each forward records this site's auxiliary
    load-balancing loss `E * sum_i f_i P_i` (f: fraction of tokens routed to i, P: mean routing score): as
    `_fwd_aux` until the model's loss hook has summed it, and, when gradients are on, as `aux` until the next
    training forward with gradients on (docs/training.md, "The aux loss's lifetime"). Copies leave both out.
    Called more than once in one model forward (a shared layer), it keeps the sum of its calls' terms.
    """

    def __init__(self, in_features: int, out_features: int, config: AdaMoLEConfig,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        register()  # torch.ops.amole.adapter exists before any forward (torch.compile must not trace this)
        e, r = config.num_experts, config.rank
        kw = dict(dtype=dtype, device=device)
        self.in_features, self.out_features = in_features, out_features
        self.method, self.num_experts, self.rank = config.method, e, r
        self.scale, self.max_threshold, self.top_k = config.scale, config.threshold_cap, config.k
        self.dropout, self.kernels = float(config.dropout), config.kernels
        self.lora_A = nn.Parameter(torch.empty(e * r, in_features, **kw))  # rows e*R:(e+1)*R are A_e
        self.lora_B = nn.Parameter(torch.empty(out_features, e * r, **kw))  # columns e*R:(e+1)*R are B_e
        spec = config.spec
        self.gate = nn.Parameter(torch.empty(e, in_features, **kw)) if spec.has_gate else None
        has_thr = spec.has_threshold
        self.threshold_weight = nn.Parameter(torch.empty(1, in_features, **kw)) if has_thr else None
        self.threshold_bias = nn.Parameter(torch.empty(1, **kw)) if has_thr else None
        self._aux: Tensor | None = None  # last forward with gradients on
        self._fwd_aux: Tensor | None = None  # this forward (any gradient mode), read by the model's loss hook
        self.track_stats = True
        self.stat_passes = "eval"  # which forwards the statistics count: "eval", "train" or "all" (PASSES)
        # expert statistics, accumulated over forwards until reset_stats(): tokens seen, tokens that selected
        # each expert [E], and how many tokens had 0..E experts active [E + 1]
        long = dict(dtype=torch.long, device=device)
        self.register_buffer("stat_tokens", torch.zeros((), **long), persistent=False)
        self.register_buffer("stat_selected", torch.zeros(e, **long), persistent=False)
        self.register_buffer("stat_active", torch.zeros(e + 1, **long), persistent=False)
        self._static_stats()
        self.reset_parameters()

    def _static_stats(self) -> None:
        """Keep the counters' lengths static under torch.compile(dynamic=True): a dynamic length could share a
        symbol with an equal sequence length (duck sizing) and tie the graph to that length."""
        for buf in (self.stat_selected, self.stat_active):
            torch._dynamo.mark_static(buf)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._static_stats()  # .to() / .cuda() replace the buffers
        return out

    def reset_parameters(self) -> None:
        """A: kaiming-uniform(a=sqrt(5)); B: zero (a fresh site adds exactly 0); router: nn.Linear's init."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        for w in (self.gate, self.threshold_weight):
            if w is not None:
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if self.threshold_bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.threshold_bias, -bound, bound)

    def extra_repr(self) -> str:
        """Method, widths, experts, rank and scale, for `repr`."""
        return (f"method={self.method}, in={self.in_features}, out={self.out_features}, "
                f"experts={self.num_experts}, rank={self.rank}, scale={self.scale:g}")

    def drop_mask(self, x: Tensor) -> Tensor | None:
        """x [T, D] -> the site's shared dropout keep-mask [T, D] (None when not dropping)."""
        if not self.drops():
            return None
        return keep_mask(x, self.dropout, one_launch=self.one_launch_mask(x))

    def drops(self) -> bool:
        """Does this forward draw a dropout mask (training mode, dropout > 0)?"""
        return self.training and self.dropout > 0

    def one_launch_mask(self, x: Tensor) -> bool:
        """Is the mask drawn with `bernoulli_` in one launch (`keep_mask`): off the CPU, or for the kernels."""
        return x.device.type != "cpu" or self.kernels == "triton"

    def wants_aux(self) -> bool:
        """Does this forward compute the aux loss (training mode, a method with a gate)?"""
        return self.training and self.gate is not None

    def op_args(self, x, drop_mask, base, tensor=getattr, with_aux=None) -> AdapterArgs:
        """The op's arguments for this site on x with `drop_mask` and `base` (tensors, or graph nodes on the graph
        path, whose `tensor(self, name)` gives the node reading parameter `name`; absent parameters stay None).
        `with_aux`: compute the aux loss (default `wants_aux()`; a graph node on the graph path)."""
        params = self._parameters

        def t(name: str):  # the parameter dict first: nn.Module.__getattr__ costs ~0.5 us a name
            value = params.get(name)
            if value is None:
                value = getattr(self, name)  # absent (None), or not a plain parameter (a parametrization)
            return value if value is None or tensor is getattr else tensor(self, name)

        return AdapterArgs(x, drop_mask, t("lora_A"), t("lora_B"), t("gate"), t("threshold_weight"),
                           t("threshold_bias"), base, self.method, self.num_experts, self.top_k, self.scale,
                           self.max_threshold, 1.0 / (1.0 - self.dropout), self.kernels,
                           self.wants_aux() if with_aux is None else with_aux)

    def weights(self) -> SiteWeights:
        """This site as one slot of a mixed batch's stack (`kernels/mixed_torch.py`); dropout only in training."""
        return SiteWeights(self.lora_A, self.lora_B, self.gate, self.threshold_weight, self.threshold_bias,
                           self.method, self.num_experts, self.top_k, self.scale, self.max_threshold,
                           self.dropout if self.training else 0.0)

    def forward(self, x: Tensor, base: Tensor | None = None, lead: tuple[int, ...] | None = None,
                rows: int = 0) -> Tensor:
        """x [..., D] (adapter dtype) -> base + delta [..., O] (or delta when base is None). `lead`: x's leading
        shape before any flattening ((B, S), or (S, B) with `rows` 1: the statistics then count the real tokens
        only; None: all)."""
        out, scores, mask, _, _, aux, _ = adapter(*self.op_args(x, self.drop_mask(x), base))
        self.record(scores, mask, lead=lead, aux=aux, rows=rows)
        return out

def expert_sets(model: nn.Module) -> list[ExpertSet]:
    """The sites in `model`, in `model.modules()` order (each once). Eager calls walk the `_modules` dicts with
    an explicit stack, ~3x faster than `modules()` (which builds every prefix string): the loss hooks walk the
    model twice per forward. Under torch.compile, `modules()` (what dynamo knows how to trace)."""
    if torch.compiler.is_compiling():
        return [m for m in model.modules() if isinstance(m, ExpertSet)]
    sites, seen, stack = [], set(), [model]
    while stack:
        m = stack.pop()
        if m is None or id(m) in seen:  # (a None child: a submodule slot set to None)
            continue
        seen.add(id(m))
        if isinstance(m, ExpertSet):
            sites.append(m)
        stack.extend(reversed(m._modules.values()))
    return sites


class AdapterGroup(nn.ModuleDict):
    """One named adapter on one projection: an `ExpertSet` per role (`group[role]`), each writing its role's
    output columns (all of them for an unfused projection; a slice or a strided set for fused QKV).
    `add_to(x, y)` adds them to the projection's output.
    """

    rows_dim = 0  # x's dimension holding the batch, for the statistics' padding: 0, 1 (seq-first), -1 (neither)

    def __init__(self, in_features: int, out_features: int, roles: tuple[str, ...],
                 columns: tuple[tuple[int, ...], ...], config: AdaMoLEConfig, dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.roles = tuple(roles)
        self.columns = tuple(tuple(c) for c in columns)
        self.config = config
        for role, cols in zip(self.roles, self.columns, strict=True):  # insertion order is role order
            self[role] = ExpertSet(in_features, len(cols), config, dtype, device)
        gather, self.n_unadapted = column_gather(self.columns, out_features, device)  # see combine_deltas
        self._whole = gather is None  # the roles write columns 0..O-1 in order
        self.register_buffer("column_gather", gather, persistent=False)

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype the adapters compute in."""
        return next(iter(self.values())).lora_A.dtype

    def columns_in_order(self) -> bool:
        """Do the roles write columns 0..O-1 in role order, in contiguous blocks (an unfused projection, or a fused
        one laid out q | k | v)? Then each role's delta can be added into its block of the output in place."""
        return self._whole

    def fused_base(self) -> bool:
        """Does a single site own every column, so the op adds it to the projection's output itself?"""
        return self.columns_in_order() and len(self.roles) == 1

    def extra_repr(self) -> str:
        """The adapted roles, for `repr`."""
        return f"roles={self.roles}"

    def add_to(self, x: Tensor, y: Tensor) -> Tensor:
        """x [..., D], y [..., O] (the projection's output) -> y + adapters(x).

        Under autocast (e.g. TRL's default bf16=True) the adapters still compute in their own dtype: the op's
        matmuls are not autocast, and its backward would otherwise meet gradients of another dtype.
        """
        if autocast_on(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._add_to(x, y, autocast=True)  # _add_to casts x to the adapters' dtype
        return self._add_to(x, y)

    def add_linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """x [..., D] -> F.linear(x, weight, bias) + every role's delta [..., O], in one autograd node
        (`kernels.op_linear`; the caller checks that the fold applies: `AdaMoLELinear.folding_group`). Each site
        draws its dropout mask and records its statistics and aux as its own forward does, in role order."""
        (y, outs), = add_linears(x, [(self, weight, bias)])
        self.record_outs(x, outs)
        return y

    def record_outs(self, x: Tensor, outs: list) -> None:
        """Record each site's statistics and aux from its (scores, mask, aux) `outs` (`add_linears`) on x [..., D]."""
        lead = x.shape[:-1]
        for site, (scores, mask, aux) in zip(self.values(), outs, strict=True):
            site.record(scores, mask, lead=lead, aux=aux, rows=self.rows_dim)

    def add_role(self, role: str, x: Tensor, y: Tensor) -> Tensor:
        """x [..., D], y [..., O_role] (this projection's output columns of `role`, in order) -> y + that role's
        delta (autocast as in `add_to`)."""
        autocast = autocast_on(x.device.type)
        with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            xa = as_dtype(x, self.adapter_dtype)
            delta = self[role](xa, lead=x.shape[:-1], rows=self.rows_dim)  # [..., O_role]; the op flattens
        return y + delta.view_as(y).to(y.dtype)

    def _add_to(self, x: Tensor, y: Tensor, autocast: bool = False) -> Tensor:
        # x [..., D] and y [..., O] go to the sites unflattened: the op flattens them where no view is recorded
        dtype = self.adapter_dtype
        xa = as_dtype(x, dtype)
        lead = x.shape[:-1]  # (B, S) for a model's hidden states: the statistics skip their padding
        if self.fused_base():
            site = self[self.roles[0]]
            if autocast and y.dtype != xa.dtype:  # the projection ran in the autocast dtype
                return site(xa, base=y.to(xa.dtype), lead=lead, rows=self.rows_dim).to(y.dtype)
            return site(xa, base=y, lead=lead, rows=self.rows_dim)
        deltas = [site(xa, lead=lead, rows=self.rows_dim) for site in self.values()]  # each [..., O_role]
        return y + combine_deltas(deltas, self.column_gather, self.n_unadapted).to(y.dtype)


PASSES = ("eval", "train", "all")  # the forwards a site's statistics may count (`ExpertSet.stat_passes`)
