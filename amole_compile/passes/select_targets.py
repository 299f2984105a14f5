"""Selection pass: keep the discovered targets a config asks for, and refuse an empty result loudly.

Pattern:        the `Target`s `find_attention` found (one per projection, with its roles and columns).
Replacement:    the targets whose roles are in `config.roles` (other roles dropped from a fused target) and
                whose module name passes `config.include` / `config.exclude` (re.search).
Preconditions:  `report` is the discovery report of the same graph.
Invariants:     targets keep their graph order; each dropped module is named in `report.skipped` with the
                reason; nothing at all selected raises `NoAttentionFound` naming what was searched and why; a
                role asked for that the architecture lacks raises `ValueError` naming it and the roles found
                (`gate` may be absent when all feed-forward roles are asked for: two-matrix MLPs); a projection
                the config selects but no adapter would reach (`reach.py`) raises `DeadAdapterError` naming
                each one and why (`check_reachable`, for transform; plan lists them as skipped), as does a
                missing role or target those explain.
"""

from __future__ import annotations

import re

from ..config import MLP_ROLES, ROLES, AdaMoLEConfig
from ._routing import EXPERTS_NOTE
from .reach import UNREACHABLE, DeadAdapterError
from .targets import PassReport, Skip, Target

SEARCHED = ("aten.scaled_dot_product_attention, and eager attention (softmax between a matmul of q and kᵀ and a "
            "matmul with v, through any ops), each fed by projections (linear, addmm, or mm / matmul / bmm with a "
            "parameter matrix)")


class NoAttentionFound(ValueError):
    """Discovery found no attention (or no adaptable projection) in the model."""


def select_targets(found: list[Target], config: AdaMoLEConfig, report: PassReport) -> list[Target]:
    """Keep the configured roles and the modules that pass include / exclude (skips go to `report.skipped`)."""
    kept = []
    for t in found:
        if config.include is not None and not re.search(config.include, t.module):
            report.skipped.append(Skip(t.module, "include", f"does not match include={config.include!r}"))
            continue
        if config.exclude is not None and re.search(config.exclude, t.module):
            report.skipped.append(Skip(t.module, "exclude", f"matches exclude={config.exclude!r}"))
            continue
        pairs = [(r, s) for r, s in zip(t.roles, t.slices, strict=True) if r in config.roles]
        if pairs:
            kept.append(Target(t.module, tuple(r for r, _ in pairs), tuple(s for _, s in pairs), t.in_features,
                               t.out_features))
    return kept


def _wanted(module: str, roles: tuple[str, ...], config: AdaMoLEConfig) -> bool:
    """Would `config` select a projection `module` with `roles`?"""
    if config.include is not None and not re.search(config.include, module):
        return False
    if config.exclude is not None and re.search(config.exclude, module):
        return False
    return any(r in config.roles for r in roles)


def check_reachable(model_name: str, report: PassReport, config: AdaMoLEConfig) -> None:
    """Raise `DeadAdapterError` naming every projection `config` selects that no adapter would reach."""
    dead = [s for s in report.skipped if s.reason in UNREACHABLE and _wanted(s.module, s.roles, config)]
    if not dead:
        return
    listed = "\n".join(f"  {s}" for s in dead)
    raise DeadAdapterError(
        f"{model_name}: {len(dead)} projection(s) the config selects cannot be adapted, as an adapter there would "
        f"never run:\n{listed}\nA projection is adapted by swapping its module, so its own forward must compute "
        "it (nn.MultiheadAttention is supported by a rewrite of its call). Leave them out with "
        "AdaMoLEConfig(exclude=...) or roles=..., or make the model call the projection modules; nothing was "
        "changed")


def check_found(model_name: str, report: PassReport, selected: list[Target], config: AdaMoLEConfig) -> None:
    """Raise `NoAttentionFound` when discovery or selection left nothing to adapt, `ValueError` for roles the
    architecture lacks; `DeadAdapterError` instead when selected projections no adapter would reach are why."""
    if report.anchors == 0 and any(r not in MLP_ROLES for r in config.roles):
        raise NoAttentionFound(f"no attention found in {model_name}: searched the captured graph for {SEARCHED}")
    if report.anchors == 0 and not report.targets:  # feed-forward roles only: a model without attention may do
        raise ValueError(f"{model_name}: roles {tuple(config.roles)} were asked for, but none was found{MLP_RULE}")
    dead = [s for s in report.skipped if s.reason in UNREACHABLE]
    have = [r for r in ROLES if any(r in t.roles for t in report.targets) or any(r in s.roles for s in dead)]
    absent = [r for r in config.roles if r not in have]
    if set(MLP_ROLES) <= set(config.roles) and "up" in have and "gate" in absent:
        absent.remove("gate")  # "mlp" / "all" on a two-matrix MLP (GPT-2, BERT, OPT): up and down only
    if not report.targets or absent or not selected:
        check_reachable(model_name, report, config)
    if not report.targets:
        raise NoAttentionFound(f"{model_name}: found {report.anchors} attention site(s) but no projection feeding "
                               f"them ({'; '.join(map(str, report.skipped[:3]))})")
    if absent and set(absent) <= set(MLP_ROLES):
        _no_mlp_but_moe(model_name, report, absent, have)
    if absent:
        skipped = f" (skipped: {'; '.join(map(str, report.skipped[:3]))})" if report.skipped else ""
        rule = MLP_RULE if not set(MLP_ROLES) & set(have) and set(absent) & set(MLP_ROLES) else ""
        raise ValueError(f"{model_name}: roles {tuple(absent)} were asked for, but only {tuple(have)} were "
                         f"found{skipped}{rule}")
    if not selected:
        raise NoAttentionFound(f"{model_name}: every projection was filtered out by roles={config.roles}, "
                               f"include={config.include!r}, exclude={config.exclude!r}")


MLP_RULE = ("; no feed-forward block was found: a down projection's input must be an elementwise function of the "
            "projections behind it (act(gate x) * (up x), or act(up x)), with no norm, reduction or matmul between "
            "(e.g. a norm on the product, as BitNet's sub-norm before down_proj), and its output as wide as their "
            "input")


def _no_mlp_but_moe(model_name: str, report: PassReport, absent: list[str], have: list[str]) -> None:
    """Feed-forward roles asked for where every feed-forward block is a mixture of experts: say so."""
    routers = [s.module for s in report.skipped if s.reason == "moe_router"]
    experts = [s.module + s.detail.partition(EXPERTS_NOTE)[2].partition(";")[0]  # "name [E, D, O]"
               for s in report.skipped if s.reason == "moe_experts"]
    if not routers:
        return
    blocks = list(dict.fromkeys(r.rpartition(".")[0] or r for r in routers))
    why = (f"MoE expert weights stored as 3-D parameters are skipped, only 2-D projections can be adapted "
           f"({'; '.join(experts)})" if experts else "its experts are not adapted (each gets the tokens the router "
           "sends it, so none is a feed-forward of every token)")
    raise ValueError(
        f"{model_name}: roles {tuple(absent)} were asked for, but every feed-forward block is a mixture of experts "
        f"({', '.join(blocks)}): {why}, and routers are never adapted. "
        f"Adaptable here: {len(report.targets)} projection(s) with roles {tuple(have)}")
