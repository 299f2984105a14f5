"""The verbs: `transform`, `targets`, `aux_loss`."""

from __future__ import annotations

import logging
import re

import torch
from torch import fx, nn

from .config import AdaMoLEConfig
from .modules import AdapterGroup, ExpertSet, linear_features
from .passes._fx import LinearCall, ParamNames, meta_value
from .passes.capture import capture
from .passes.find_attention import find_attention
from .passes.insert_ops import PREFIX, insert_ops
from .passes.plan import PassReport, Target, compress
from .passes.swap_modules import swap_modules

log = logging.getLogger("amole_compile")

SEARCHED = ("aten.scaled_dot_product_attention, and eager attention (softmax between a matmul of q and kᵀ and a "
            "matmul with v), each fed by linear / addmm projections")


class NoAttentionFound(ValueError):
    """Discovery found no attention (or no adaptable projection) in the model."""


def _features_from(model: nn.Module | None) -> callable:
    def features(call: LinearCall) -> tuple[int, int]:
        layer = model.get_submodule(call.module) if model is not None else None
        feats = linear_features(layer) if layer is not None else None
        if feats is not None:
            return feats
        x, y = meta_value(call.input), meta_value(call.node)
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            return int(x.shape[-1]), int(y.shape[-1])
        raise NoAttentionFound(f"cannot tell the shape of projection {call.module}")

    return features


def select(targets: list[Target], config: AdaMoLEConfig, report: PassReport) -> list[Target]:
    """Keep the configured roles and the modules that pass include / exclude."""
    kept = []
    for t in targets:
        if config.include is not None and not re.search(config.include, t.module):
            report.skipped.append(f"{t.module}: does not match include={config.include!r}")
            continue
        if config.exclude is not None and re.search(config.exclude, t.module):
            report.skipped.append(f"{t.module}: matches exclude={config.exclude!r}")
            continue
        pairs = [(r, s) for r, s in zip(t.roles, t.slices, strict=True) if r in config.roles]
        if pairs:
            kept.append(Target(t.module, tuple(r for r, _ in pairs), tuple(s for _, s in pairs), t.in_features,
                               t.out_features))
    return kept


def _check_found(model: object, report: PassReport, selected: list[Target], config: AdaMoLEConfig) -> None:
    name = type(model).__name__
    if report.anchors == 0:
        raise NoAttentionFound(f"no attention found in {name}: searched the captured graph for {SEARCHED}")
    if not report.targets:
        raise NoAttentionFound(f"{name}: found {report.anchors} attention site(s) but no projection feeding them "
                               f"({'; '.join(report.skipped[:3])})")
    if not selected:
        raise NoAttentionFound(f"{name}: every projection was filtered out by roles={config.roles}, "
                               f"include={config.include!r}, exclude={config.exclude!r}")


def plan(model: nn.Module, config: AdaMoLEConfig | None = None, *, example_inputs=None) -> tuple[list[Target],
                                                                                                   PassReport]:
    """Capture and analyse `model` without changing it: -> (targets to adapt, discovery report)."""
    config = config or AdaMoLEConfig()
    if isinstance(model, fx.GraphModule):
        found, report = find_attention(model.graph, ParamNames(model), _features_from(model))
    else:
        ep = capture(model, example_inputs)
        params = ParamNames(None, dict(ep.graph_signature.inputs_to_parameters))
        found, report = find_attention(ep.graph, params, _features_from(model))
    selected = select(found, config, report)
    _check_found(model, report, selected, config)
    return selected, report


def _is_adapted(model: nn.Module) -> bool:
    return any(isinstance(m, AdapterGroup) for m in model.modules())


def transform(model, config: AdaMoLEConfig | None = None, *, example_inputs=None):
    """Put AdaMoLE adapters on the attention projections found in `model`'s graph.

    nn.Module in: the projections are swapped in place (the frozen originals stay as `.base_layer`), every
    other parameter is frozen, and the same object is returned. `torch.fx.GraphModule` in: AdaMoLE op nodes are
    inserted into its graph in place. `torch.export.ExportedProgram` in: returns its `.module()` rewritten the
    same way. HF text models need no example inputs; other modules take `example_inputs=` (tuple or dict).
    On any error the model is left exactly as it was.
    """
    config = config or AdaMoLEConfig()
    if not isinstance(config, AdaMoLEConfig):
        raise TypeError(f"config must be an AdaMoLEConfig, got {type(config).__name__}")
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if not isinstance(model, nn.Module):
        raise TypeError(f"transform takes an nn.Module, GraphModule or ExportedProgram, got {type(model).__name__}")
    if _is_adapted(model):
        raise ValueError(f"{type(model).__name__} is already transformed by amole_compile; transform the base "
                         "model once (load other adapters with load_adapters)")
    selected, report = plan(model, config, example_inputs=example_inputs)
    log.info(report.summary())
    return apply_plan(model, selected, config)


def apply_plan(model: nn.Module, selected: list[Target], config: AdaMoLEConfig) -> nn.Module:
    """Run the rewrite for a plan from `plan()`: insert op nodes (GraphModule) or swap modules (nn.Module)."""
    if isinstance(model, fx.GraphModule):
        insert_ops(model, selected, config)
        return model
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    swap_modules(model, selected, config)
    _allow_aux_under_checkpoint()
    _freeze_base(model)
    model._amole_requires_grad = flags  # restored by untransform
    return model


def _allow_aux_under_checkpoint() -> None:
    """Each site records its aux loss on itself (a Python side effect). Under torch.compile, such a side effect
    inside an activation-checkpointed region is a graph break unless dynamo keeps the forward's side effects
    without replaying them in the recompute, which is what eager checkpointing amounts to for the aux loss."""
    cfg = torch._dynamo.config
    if hasattr(cfg, "skip_fwd_side_effects_in_bwd_under_checkpoint") and \
            not cfg.skip_fwd_side_effects_in_bwd_under_checkpoint:
        cfg.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        log.info("set torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True (aux loss under "
                 "compiled gradient checkpointing)")


def _freeze_base(model: nn.Module) -> None:
    adapter_params = {id(p) for m in model.modules() if isinstance(m, ExpertSet) for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapter_params)


def untransform(model: nn.Module) -> nn.Module:
    """Remove the adapters: put base layers back and restore the base parameters' requires_grad flags."""
    from .passes.insert_ops import remove_ops
    from .passes.swap_modules import unswap_modules

    if isinstance(model, fx.GraphModule) and remove_ops(model):
        return model
    unswap_modules(model)
    flags = model.__dict__.pop("_amole_requires_grad", {})
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, p.requires_grad))
    return model


def adapter_groups(model: nn.Module) -> list[tuple[str, AdapterGroup]]:
    """(module name, group) for every adapted projection, in model order (graph path names unprefixed)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, AdapterGroup):
            out.append((name[len(PREFIX) + 1:] if name.startswith(PREFIX + ".") else name, mod))
    return out


def targets(model: nn.Module) -> list[Target]:
    """The adapted projections of a transformed model, as `Target(module, roles, slices, in, out)`."""
    return [Target(name, g.roles, tuple(compress(c) for c in g.columns), g.in_features, g.out_features)
            for name, g in adapter_groups(model)]


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum over sites of the auxiliary load-balancing loss recorded by the last training-mode forward.

    A 0-dim tensor on the model's device; 0 when nothing was recorded (eval mode, LoRA, no forward yet).
    Training adds `1e-3 * aux_loss(model)` to the task loss, as the reference does.
    """
    losses = [m.aux for m in model.modules() if isinstance(m, ExpertSet) and m.aux is not None]
    if losses:
        return torch.stack(losses).sum()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.zeros((), device=device)
