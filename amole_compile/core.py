"""The verbs: `plan`, `transform`, `untransform`, `targets`, `aux_loss`, `is_transformed`.

The pipeline flows one way, each step handing the next a value:

    capture (passes/capture.py)  ->  analyse (passes/find_attention.py)  ->  select (passes/select_targets.py)
        -> Plan  ->  rewrite (passes/swap_modules.py for nn.Module, passes/insert_ops.py for GraphModule)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
from torch import fx, nn

from . import model_hooks, quantized
from .adapted import ACTIVE, adapter_groups, adapter_names, is_transformed, projections, targets
from .config import MLP_ROLES, ROLES, AdaMoLEConfig
from .kernels import register as register_op
from .modules import ExpertSet
from .passes._fx import ParamNames
from .passes.capture import CaptureError, capture, capture_blocks, find_blocks
from .passes.find_attention import find_attention
from .passes.insert_ops import insert_ops, remove_ops
from .passes.select_targets import NoAttentionFound, check_found, select_targets
from .passes.swap_modules import swap_modules, unswap_modules
from .passes.targets import PassReport, Plan, Target
from .projection import AdaMoLELinear

__all__ = ["NoAttentionFound", "adapter_groups", "aux_loss", "is_transformed", "plan", "rewrite", "targets",
           "transform", "untransform"]

log = logging.getLogger("amole_compile")


def plan(model: nn.Module, config: AdaMoLEConfig | None = None, *,
         example_inputs: tuple | dict | torch.Tensor | None = None) -> Plan:
    """Capture and analyse `model` without changing it: -> the `Plan` `transform` would carry out.

    The plan lists the targets (projection, roles, columns) selected by `config` (roles, include, exclude) and
    a report of every attention site and projection found and what was skipped, with the reason.
    """
    return _plan(model, config or AdaMoLEConfig(), example_inputs)


def _plan(model: nn.Module, config: AdaMoLEConfig, example_inputs) -> Plan:
    if not isinstance(model, fx.GraphModule) and quantized.library(model) is not None:
        twin = _plan(quantized.twin(model), config, example_inputs)  # quantized layers do not trace
        return Plan(type(model).__name__, list(twin.targets), twin.report)
    found, report = _analyse(model, example_inputs, mlp=any(r in MLP_ROLES for r in config.roles))
    selected = select_targets(found, config, report)
    check_found(type(model).__name__, report, selected, config)
    return Plan(type(model).__name__, list(selected), report)


def _analyse(model: nn.Module, example_inputs, mlp: bool = False) -> tuple[list[Target], PassReport]:
    """Capture and run discovery. HF models with layer lists are captured block by block (one capture per
    distinct block); other modules whole, block by block only when the whole model does not export."""
    if isinstance(model, fx.GraphModule):
        return find_attention(model.graph, ParamNames(model), mlp)
    has_blocks = bool(find_blocks(model))
    if not (has_blocks and getattr(model, "config", None) is not None):
        try:
            return _analyse_whole(model, example_inputs, mlp)
        except CaptureError:
            if not has_blocks:
                raise
            return _analyse_blocks(model, example_inputs, mlp)
    try:
        found, report = _analyse_blocks(model, example_inputs, mlp)
    except CaptureError:
        return _analyse_whole(model, example_inputs, mlp)
    return (found, report) if report.anchors else _analyse_whole(model, example_inputs, mlp)


def _analyse_whole(model: nn.Module, example_inputs, mlp: bool = False) -> tuple[list[Target], PassReport]:
    ep = capture(model, example_inputs)
    return find_attention(ep.graph, ParamNames.of_export(ep), mlp)


def _analyse_blocks(model: nn.Module, example_inputs, mlp: bool = False) -> tuple[list[Target], PassReport]:
    """Discovery on each distinct block's capture, replayed on the blocks like it (names re-prefixed)."""
    groups = capture_blocks(model, example_inputs)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    report, found, seen = PassReport("find_attention"), [], set()
    for group in groups:
        if group.program is None:
            instead = "; its submodules were captured instead" if group.split else ""
            report.skipped += [f"{name}: not captured ({group.error}){instead}" for name in group.names]
            report.blocks.update({name: f"not captured{instead}" for name in group.names})
            continue
        targets, rep = find_attention(group.program.graph, ParamNames.of_export(group.program), mlp)
        report.anchors += rep.anchors * sum(group.calls.get(name, 1) for name in group.names)
        roles = [r for r in ROLES if any(r in t.roles for t in targets)]
        found_here = f"{rep.anchors} attention site(s); roles {' '.join(roles) or 'none'}; {len(rep.skipped)} skipped"
        for name in group.names:
            report.add_block(name, found_here + (f" (analysis of {group.names[0]} replayed)" if name != group.names[0]
                                                 else ""), [f"{name}.{t.module}" for t in targets],
                             group.calls.get(name, 1))
            report.skipped += [f"{name}.{s}" for s in rep.skipped]
            for i, t in enumerate(targets):  # graph order within a block, model order across blocks
                module = f"{name}.{t.module}"
                if module not in seen:
                    seen.add(module)
                    found.append(((order.get(name, len(order)), i), dataclasses.replace(t, module=module)))
    failed = [g for g in groups if g.program is None]
    if failed and (report.anchors == 0 or not groups):  # what did not capture may be where the attention is
        raise CaptureError(f"could not capture {type(model).__name__}, whole or block by block: the first "
                           f"block, {failed[0].names[0]}, failed with {failed[0].error}")
    found = [t for _, t in sorted(found, key=lambda kt: kt[0])]
    report.blocks = dict(sorted(report.blocks.items(), key=lambda kv: order.get(kv[0], len(order))))
    report.targets = found
    return found, report


def transform(model: nn.Module | torch.export.ExportedProgram, config: AdaMoLEConfig | None = None, *,
              adapter_name: str = "default", plan: Plan | None = None,
              example_inputs: tuple | dict | torch.Tensor | None = None) -> nn.Module:
    """Put AdaMoLE adapters on the attention projections found in `model`'s graph.

    nn.Module in: the projections are swapped in place (the frozen originals stay as `.base_layer`), every
    other parameter is frozen, and the same object is returned. `torch.fx.GraphModule` in: AdaMoLE op nodes are
    inserted into its graph in place. `torch.export.ExportedProgram` in: returns its `.module()` rewritten the
    same way. HF text models need no example inputs; other modules take `example_inputs=` (tuple or dict).
    `plan=`: a `Plan` from `amole_compile.plan` (possibly filtered): adapt exactly its targets, no capture.
    `adapter_name=`: the adapter's name (default "default"). Transforming a transformed model with a new name
    adds another adapter on the projections its own config selects (E, rank, method and roles may differ from
    the others'); the new adapter becomes the active one (`set_active_adapter`), the only one that trains.
    On any error the model is left exactly as it was.
    """
    config = config or AdaMoLEConfig()
    if not isinstance(config, AdaMoLEConfig):
        raise TypeError(f"config must be an AdaMoLEConfig, got {type(config).__name__}")
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if not isinstance(model, nn.Module):
        raise TypeError(f"transform takes an nn.Module, GraphModule or ExportedProgram, got {type(model).__name__}")
    check_adapter_name(adapter_name)
    adding = is_transformed(model)
    if adding and adapter_name in adapter_names(model):
        raise ValueError(f"{type(model).__name__} holds an adapter named {adapter_name!r} already (it holds "
                         f"{adapter_names(model)}); pick another adapter_name, or delete_adapter it first")
    if adding and isinstance(model, fx.GraphModule):
        raise ValueError("a GraphModule holds one adapter (its op nodes are baked into the graph): transform "
                         "the nn.Module for several named adapters")
    if plan is None:
        with _bare(model):
            plan = _plan(model, config, example_inputs)
        log.info(plan.report.summary())
    elif not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan from amole_compile.plan, got {type(plan).__name__}")
    elif not plan.targets:
        raise ValueError("plan has no targets: nothing to adapt")
    log.info(rewrite(model, list(plan.targets), config, adapter_name).summary())
    return model


def check_adapter_name(name: str) -> str:
    """`name` if it can name an adapter (a non-empty string without dots that is no nn.Module attribute, since
    it names a submodule), else ValueError."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {name!r}")
    if hasattr(nn.ModuleDict, name):
        raise ValueError(f"adapter_name {name!r} is the name of an nn.Module attribute; pick another name")
    return name


@contextlib.contextmanager
def _bare(model: nn.Module):
    """The model with its base layers back in place of the adapted ones (for planning another adapter)."""
    holders = [(n, m) for n, m in model.named_modules() if isinstance(m, AdaMoLELinear)]
    for name, holder in holders:
        model.set_submodule(name, holder.base_layer)
    try:
        yield model
    finally:
        for name, holder in holders:
            model.set_submodule(name, holder)


def rewrite(model: nn.Module, selected: list[Target], config: AdaMoLEConfig,
            name: str = "default") -> PassReport:
    """Carry out a plan's targets as adapter `name`: insert op nodes (GraphModule) or swap modules (nn.Module),
    then make `name` the active adapter -> the report."""
    if isinstance(model, fx.GraphModule):
        return insert_ops(model, selected, config, name)
    first = not is_transformed(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    report = swap_modules(model, selected, config, name)
    if first:
        register_op()  # now, not on the first forward: inside a compiled forward it is a graph break
        model_hooks.attach(model, config.aux_loss_coef)
        quantized.mark_trainable(model)
        quantized.keep_stored_format(model)
        _DynamoFlag.acquire(model)
        model.__dict__["_amole_requires_grad"] = flags  # restored by untransform
    activate(model, name)
    return report


def activate(model: nn.Module, name: str | None) -> None:
    """Adapter `name` runs on every projection it adapts (None: none runs) and is the only one whose parameters
    train; the model's aux-loss coefficient becomes its config's."""
    for _, proj in projections(model):
        proj.active = name if name is not None and name in proj.adapters else None
    model.__dict__[ACTIVE] = name
    groups = adapter_groups(model, name) if name is not None else []
    trainable = {id(p) for _, g in groups for p in g.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    if groups and model_hooks.attached(model):
        model_hooks.set_aux_coef(model, groups[0][1].config.aux_loss_coef)


class _DynamoFlag:
    """`torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint`, held while any model is transformed.

    Each site records its aux loss on itself (a Python side effect). Under torch.compile, such a side effect
    inside an activation-checkpointed region is a graph break unless dynamo keeps the forward's side effects
    without replaying them in the recompute, which is what eager checkpointing amounts to for the aux loss.
    The flag is process-wide: it is set when the first model is transformed and restored to its earlier value
    when the last one is untransformed.
    """

    NAME = "skip_fwd_side_effects_in_bwd_under_checkpoint"
    holders = 0
    saved: bool | None = None

    @classmethod
    def acquire(cls, model: nn.Module) -> None:
        cfg = torch._dynamo.config
        if not hasattr(cfg, cls.NAME) or model.__dict__.get("_amole_flag"):
            return
        if cls.holders == 0:
            cls.saved = getattr(cfg, cls.NAME)
        if not getattr(cfg, cls.NAME):
            setattr(cfg, cls.NAME, True)
            log.info("set torch._dynamo.config.%s = True (aux loss under compiled gradient checkpointing); "
                     "untransform restores it", cls.NAME)
        cls.holders += 1
        model.__dict__["_amole_flag"] = True

    @classmethod
    def release(cls, model: nn.Module) -> None:
        if not model.__dict__.pop("_amole_flag", False):
            return
        cls.holders -= 1
        if cls.holders == 0 and cls.saved is not None:
            setattr(torch._dynamo.config, cls.NAME, cls.saved)


def untransform(model: nn.Module) -> nn.Module:
    """Remove the adapters: put base layers back, restore the base parameters' requires_grad flags and any
    process-wide setting `transform` changed."""
    if isinstance(model, fx.GraphModule) and remove_ops(model):
        return model
    unswap_modules(model)
    model.__dict__.pop(ACTIVE, None)
    model_hooks.detach(model)
    quantized.unmark_trainable(model)
    quantized.restore_format(model)
    flags = model.__dict__.pop("_amole_requires_grad", {})
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, p.requires_grad))
    _DynamoFlag.release(model)
    return model


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum over sites of the auxiliary load-balancing loss recorded by the last training-mode forward with
    gradients on (a forward under `torch.no_grad()` does not replace it).

    A 0-dim tensor on the model's device; 0 when nothing was recorded (eval mode, LoRA, no forward yet).
    For custom loops only, and without double counting: a transformed model already adds
    `AdaMoLEConfig.aux_loss_coef * aux` (default 1e-3) to the `loss` it returns in training mode. A loop that
    adds `coef * aux_loss(model)` itself transforms with `aux_loss_coef=0`.
    """
    losses = [m.aux for m in model.modules() if isinstance(m, ExpertSet) and m.aux is not None]
    if losses:
        return torch.stack(losses).sum()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.zeros((), device=device)
