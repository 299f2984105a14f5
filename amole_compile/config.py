"""`AdaMoLEConfig`: the one frozen, validated, JSON round-trippable config for every method."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from .kernels.backend import KERNELS
from .kernels.methods import METHODS as _METHOD_TABLE
from .kernels.methods import MethodSpec

METHODS = tuple(_METHOD_TABLE)
ATTENTION_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")
ROLES = ATTENTION_ROLES + MLP_ROLES
ROLE_GROUPS = {"attention": ATTENTION_ROLES, "mlp": MLP_ROLES, "all": ROLES}  # shorthands, expanded in place
ADAPTER_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_TOP_K = 2
DEFAULT_EXPERTS = 8
DEFAULT_AUX_LOSS_COEF = 1e-3


def _fail(field: str, allowed: str, got: Any) -> None:
    raise ValueError(f"AdaMoLEConfig.{field} must be {allowed}, got {got!r}")


def _methods_with(flag: str) -> tuple[str, ...]:
    return tuple(m.name for m in _METHOD_TABLE.values() if getattr(m, flag))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class AdaMoLEConfig:
    """What to put on each attention projection.

    method         "adamole" (threshold routing), "mole" (top-k routing) or "lora" (one expert, no router).
    num_experts    experts per site, >= 1. None means 8 for adamole/mole and 1 for lora (lora takes only 1).
    rank           rank of each expert, >= 1; the site's total rank is num_experts * rank.
    alpha          LoRA alpha, > 0; each expert is scaled by alpha / rank.
    dropout        input dropout in [0, 1). One mask is drawn per site and shared by its experts
                   (the upstream code draws one per expert); the gate and threshold see the undropped input.
    max_threshold  AdaMoLE's threshold cap in (0, 1]; None means 1 / num_experts.
    top_k          MoLE's experts per token in 1..num_experts; None means min(2, num_experts).
    roles          which projections to adapt, in any order: attention q, k, v, o and feed-forward gate, up,
                   down; "attention", "mlp" and "all" stand for their roles (alone or inside the tuple).
                   Default: q, k, v, o.
    include        regex; only projections whose module name matches (re.search) are adapted.
    exclude        regex; projections whose module name matches are skipped.
    adapter_dtype  "float32", "bfloat16", "float16", or None for the base layer's dtype.
    kernels        "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton"; the environment
                   variable AMOLE_KERNELS overrides it.
    aux_loss_coef  weight of the auxiliary load-balancing loss, >= 0 (default 1e-3, as the reference trains).
                   Like Mixtral's `router_aux_loss_coef`: a training-mode forward that returns a `loss` returns
                   `loss + aux_loss_coef * aux` and the aux value as `aux_loss`, so HF `Trainer`, TRL `SFTTrainer`
                   and plain loops train the router with no subclass. 0 leaves the loss alone (add
                   `coef * amole_compile.aux_loss(model)` yourself in a custom loop; never both).
    """

    method: str = "adamole"
    num_experts: int | None = None
    rank: int = 4
    alpha: float = 16.0
    dropout: float = 0.05
    max_threshold: float | None = None
    top_k: int | None = None
    roles: tuple[str, ...] = ATTENTION_ROLES
    include: str | None = None
    exclude: str | None = None
    adapter_dtype: str | None = None
    kernels: str = "auto"
    aux_loss_coef: float = DEFAULT_AUX_LOSS_COEF

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            _fail("method", f"one of {METHODS}", self.method)
        self._resolve_num_experts()
        if not _is_int(self.rank) or self.rank < 1:
            _fail("rank", "an integer >= 1", self.rank)
        if not _is_real(self.alpha) or self.alpha <= 0:
            _fail("alpha", "a finite number > 0", self.alpha)
        if not _is_real(self.dropout) or not 0 <= self.dropout < 1:
            _fail("dropout", "a number in [0, 1)", self.dropout)
        self._check_router_fields()
        self._check_roles()
        for field in ("include", "exclude"):
            self._check_regex(field)
        if self.adapter_dtype is not None and self.adapter_dtype not in ADAPTER_DTYPES:
            _fail("adapter_dtype", f"None or one of {ADAPTER_DTYPES}", self.adapter_dtype)
        if self.kernels not in KERNELS:
            _fail("kernels", f"one of {KERNELS}", self.kernels)
        if not _is_real(self.aux_loss_coef) or self.aux_loss_coef < 0:
            _fail("aux_loss_coef", "a finite number >= 0", self.aux_loss_coef)

    def _resolve_num_experts(self) -> None:
        e, fixed = self.num_experts, self.spec.fixed_experts
        if e is None:
            object.__setattr__(self, "num_experts", fixed if fixed is not None else DEFAULT_EXPERTS)
        elif not _is_int(e) or e < 1:
            _fail("num_experts", "an integer >= 1", e)
        elif fixed is not None and e != fixed:
            _fail("num_experts", f"{fixed} (or None) when method is {self.method!r}", e)

    def _check_router_fields(self) -> None:
        mt, k = self.max_threshold, self.top_k
        if mt is not None:
            if not self.spec.has_threshold:
                _fail("max_threshold", f"None unless method is one of {_methods_with('has_threshold')}", mt)
            if not _is_real(mt) or not 0 < mt <= 1:
                _fail("max_threshold", "None or a number in (0, 1]", mt)
        if k is not None:
            if not self.spec.uses_top_k:
                _fail("top_k", f"None unless method is one of {_methods_with('uses_top_k')}", k)
            if not _is_int(k) or not 1 <= k <= self.num_experts:
                _fail("top_k", f"None or an integer in 1..{self.num_experts} (num_experts)", k)

    def _check_roles(self) -> None:
        roles = self.roles
        if isinstance(roles, str) and roles in ROLE_GROUPS:
            roles = (roles,)
        if isinstance(roles, str) or not isinstance(roles, (tuple, list)):
            _fail("roles", f"a non-empty tuple drawn from {ROLES} (or {tuple(ROLE_GROUPS)})", roles)
        roles = tuple(r2 for r in roles for r2 in (ROLE_GROUPS.get(r, (r,)) if isinstance(r, str) else (r,)))
        if not roles or any(r not in ROLES for r in roles) or len(set(roles)) != len(roles):
            _fail("roles", f"a non-empty tuple of distinct roles drawn from {ROLES}", roles)
        object.__setattr__(self, "roles", tuple(r for r in ROLES if r in roles))

    def _check_regex(self, field: str) -> None:
        pattern = getattr(self, field)
        if pattern is None:
            return
        if not isinstance(pattern, str):
            _fail(field, "None or a regular expression string", pattern)
        try:
            re.compile(pattern)
        except re.error as exc:
            _fail(field, f"a valid regular expression ({exc})", pattern)

    # ---- derived values -------------------------------------------------------------------------
    @property
    def spec(self) -> MethodSpec:
        """The method's row of the method table (`kernels/methods.py`)."""
        return _METHOD_TABLE[self.method]

    @property
    def scale(self) -> float:
        """Per-expert LoRA scaling s = alpha / rank."""
        return float(self.alpha) / self.rank

    @property
    def threshold_cap(self) -> float:
        """AdaMoLE's max_threshold with its default (1 / num_experts) filled in; 0 for other methods."""
        if not self.spec.has_threshold:
            return 0.0
        return float(self.max_threshold) if self.max_threshold is not None else 1.0 / self.num_experts

    @property
    def k(self) -> int:
        """MoLE's top_k with its default filled in; 0 for other methods."""
        if not self.spec.uses_top_k:
            return 0
        return self.top_k if self.top_k is not None else min(DEFAULT_TOP_K, self.num_experts)

    # ---- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (roles as a list)."""
        d = dataclasses.asdict(self)
        d["roles"] = list(self.roles)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaMoLEConfig:
        """A config from `to_dict`'s dict; ValueError naming unknown fields or bad values."""
        if not isinstance(data, dict):
            raise ValueError(f"AdaMoLEConfig.from_dict needs a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"AdaMoLEConfig has no field(s) {unknown}; known fields: {sorted(known)}")
        data = dict(data)
        if isinstance(data.get("roles"), list):
            data["roles"] = tuple(data["roles"])
        return cls(**data)

    def to_json(self) -> str:
        """The config as JSON text (sorted keys)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdaMoLEConfig:
        """A config from `to_json`'s text; ValueError on invalid JSON or values."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"AdaMoLEConfig JSON is not valid JSON: {exc}") from exc
        return cls.from_dict(data)
