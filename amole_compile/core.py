"""The verbs on a model: `plan`, `transform`, `untransform`, `targets`, `aux_loss`, `is_transformed`, and the
named-adapter verbs `adapter_names`, `active_adapter`, `set_active_adapter`, `delete_adapter`,
`batch_adapters`.

The pipeline flows one way, each step handing the next a value:

    discover (passes/discover.py: capture -> find -> replay -> select)  ->  Plan
        ->  rewrite (passes/swap_modules.py for nn.Module, passes/insert_ops.py for GraphModule)
        ->  the model's record and what it installs (model/state.py, integrations/patches.py)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Iterator, Sequence

import torch
from torch import fx, nn

from .config import ROLES, AdaMoLEConfig
from .integrations import patches
from .integrations.foreign import check_not_adapted_elsewhere
from .kernels import register as register_op
from .model.batch import check_unused, mixed_batch, row_ids
from .model.modules import expert_sets
from .model.state import (
    activate,
    active_adapter,
    adapter_groups,
    adapter_names,
    attach_state,
    bare,
    check_adapter_name,
    check_name,
    detach_state,
    drop,
    is_transformed,
    state_of,
    targets,
)
from .passes.check_calls import check_adapters_run
from .passes.discover import discover
from .passes.find_rows import find_rows
from .passes.find_siblings import link_siblings
from .passes.insert_ops import insert_ops, remove_ops
from .passes.reach import DeadAdapterError
from .passes.select_targets import NoAttentionFound
from .passes.swap_modules import UnsupportedLayerError, swap_modules, unswap_modules
from .passes.targets import PassReport, Plan, Target

__all__ = ["DeadAdapterError", "NoAttentionFound", "active_adapter", "adapter_groups", "adapter_names", "aux_loss",
           "batch_adapters", "delete_adapter", "is_transformed", "plan", "rewrite", "set_active_adapter", "targets",
           "transform", "untransform"]

log = logging.getLogger("amole_compile")
GRAPH_UNDO = "graph_ops"  # a GraphModule's undo entry: its graph before insert_ops


def plan(model: nn.Module, config: AdaMoLEConfig | None = None, *,
         example_inputs: tuple | dict | torch.Tensor | None = None) -> Plan:
    """Capture and analyse `model` without changing it: -> the `Plan` `transform` would carry out.

    The plan lists the targets (projection, roles, columns) selected by `config` (roles, include, exclude) and
    a report of every attention site and projection found and what was skipped, with the reason.
    """
    return discover(model, config or AdaMoLEConfig(), example_inputs, refuse=False)


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
    check_not_adapted_elsewhere(model)
    adding = is_transformed(model)
    if adding and adapter_name in adapter_names(model):
        raise ValueError(f"{type(model).__name__} holds an adapter named {adapter_name!r} already (it holds "
                         f"{adapter_names(model)}); pick another adapter_name, or delete_adapter it first")
    if adding and isinstance(model, fx.GraphModule):
        raise ValueError("a GraphModule holds one adapter (its op nodes are baked into the graph): transform "
                         "the nn.Module for several named adapters")
    if plan is None:
        with bare(model):
            plan = discover(model, config, example_inputs)
        log.info(plan.report.summary())
    elif not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan from amole_compile.plan, got {type(plan).__name__}")
    elif not plan.targets:
        raise ValueError("plan has no targets: nothing to adapt")
    else:
        config = carried_out(config, plan.targets)
    log.info(rewrite(model, list(plan.targets), config, adapter_name, example_inputs).summary())
    return model


def carried_out(config: AdaMoLEConfig, selected: list[Target]) -> AdaMoLEConfig:
    """`config` saying what a given plan carried out: its roles and exactly its modules, so that the config
    saved with the adapters selects these targets again on a fresh base (a plan narrowed with `Plan.filter`
    holds fewer than the config would select)."""
    roles = tuple(r for r in ROLES if any(r in t.roles for t in selected))
    include = "^(?:" + "|".join(re.escape(t.module) for t in selected) + ")$"
    return dataclasses.replace(config, roles=roles, include=include, exclude=None)


def rewrite(model: nn.Module, selected: list[Target], config: AdaMoLEConfig, name: str = "default",
            example_inputs=None) -> PassReport:
    """Carry out a plan's targets as adapter `name`: insert op nodes (GraphModule) or swap modules (nn.Module,
    then check with a forward of `example_inputs` (None: a HF model's synthesised ones) that every adapted
    projection's adapters run: `DeadAdapterError` otherwise, the model as it was); a first adapter gets the
    model's record and what it installs; then `name` becomes the active adapter -> the report."""
    first = state_of(model) is None and not is_transformed(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    if isinstance(model, fx.GraphModule):
        report, original = insert_ops(model, selected, config, name)
        attach_state(model, flags).undo.append((GRAPH_UNDO, original))
    else:
        report = swap_modules(model, selected, config, name)
        if first:
            register_op()  # now, not on the first forward: inside a compiled forward it is a graph break
            attach_state(model, flags)
        record = state_of(model)
        installed = len(record.undo) if record is not None else 0
        if record is not None:
            patches.attach(model, record)  # a first adapter's rows; a later one's that apply now (attention)
        calls: list = []
        try:
            check_adapters_run(model, [t.module for t in selected], example_inputs, calls)
        except (DeadAdapterError, UnsupportedLayerError):  # (a projection whose forward returns no tensor)
            if first:
                untransform(model)
            else:
                drop(model, name)
                patches.detach(model, record, keep=installed)
            raise
        link_siblings(model, calls)
        log.info(find_rows(model, example_inputs).summary())
    activate(model, name, freeze_base=True)
    return report


def untransform(model: nn.Module) -> nn.Module:
    """Remove the adapters: put base layers back, pop everything `transform` installed (hooks, overrides,
    flags, process-wide settings) and restore the parameters' requires_grad flags."""
    record = state_of(model)
    if isinstance(model, fx.GraphModule) and record is not None and record.token(GRAPH_UNDO) is not None:
        remove_ops(model, record.token(GRAPH_UNDO))
    else:
        unswap_modules(model)
    if record is None:
        return model
    patches.detach(model, record)
    detach_state(model)
    for n, p in model.named_parameters():
        p.requires_grad_(record.requires_grad.get(n, p.requires_grad))
    return model


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum over sites of the auxiliary load-balancing loss recorded by the last training-mode forward with
    gradients on (a forward under `torch.no_grad()` does not replace it).

    A 0-dim tensor on the model's device; 0 when nothing was recorded (eval mode, LoRA, no forward yet, a fresh
    copy of the model). For custom loops only, and without double counting: a transformed model already adds
    `AdaMoLEConfig.aux_loss_coef * aux` (default 1e-3) to the `loss` it returns in training mode. A loop that
    adds `coef * aux_loss(model)` itself transforms with `aux_loss_coef=0`. Each site holds its value until the
    next training forward with gradients on (docs/training.md, "The aux loss's lifetime").
    """
    losses = [m.aux for m in expert_sets(model) if m.aux is not None]
    if losses:
        return torch.stack(losses).sum()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.zeros((), device=device)


# ---- named adapters -----------------------------------------------------------------------------------------
def set_active_adapter(model: nn.Module, name: str | None) -> nn.Module:
    """Run adapter `name` (None: no adapter, the base model). Only the active adapter's parameters train (the
    model's own parameters keep their flags), and the model adds its config's `aux_loss_coef` times the aux loss
    to its loss. Returns the model."""
    if not is_transformed(model):
        raise ValueError(f"{type(model).__name__} holds no AdaMoLE adapters; transform it first")
    if name is not None:
        check_name(model, name)
    if isinstance(model, fx.GraphModule) and name is None:
        raise ValueError("a GraphModule's adapter is part of its graph and cannot be switched off; untransform it")
    activate(model, name)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter `name`. Projections left with no adapter get their base layer back; removing the last
    adapter untransforms the model. If `name` was active, the first remaining adapter becomes active (logged).
    An adapter that an open `batch_adapters` block runs cannot be deleted (ValueError naming the block).
    Returns the model."""
    check_name(model, name)
    check_unused(model, name)
    if adapter_names(model) == [name]:
        return untransform(model)
    was_active = active_adapter(model) == name
    drop(model, name)
    if was_active:
        new = adapter_names(model)[0]
        log.warning("deleted the active adapter %r; %r is active now", name, new)
        activate(model, new)
    return model


@contextlib.contextmanager
def batch_adapters(model: nn.Module, rows: Sequence[str | int | None]) -> Iterator[nn.Module]:
    """Within the block, row i of every batch runs adapter `rows[i]`: a name, an index into `adapter_names`, or
    None / -1 for the base model. The batch must have len(rows) rows (or a multiple: `generate` repeats each
    row for beams and return sequences). Rows of one adapter equal that adapter run alone on them.

    The rows belong to this call: they are kept in a `contextvars.ContextVar` (under torch.compile, per
    thread), so other threads and tasks are not affected, and nothing is left when the block exits. In a mixed
    batch each row gathers its adapter's weights: one batched computation whatever the mix, and no shape that
    depends on it, so torch.compile does not recompile when the mix changes (docs/adapters.md). The rows are the
    dimension of each projection's input that transform found holding them (`passes/find_rows.py`: [S, B, D] in
    a seq-first model); a projection where none does raises ValueError, naming it."""
    if isinstance(rows, (str, torch.Tensor)) or not isinstance(rows, Sequence):
        raise TypeError(f"batch_adapters takes a list of adapter names (or None) per row, got {type(rows).__name__}")
    ids = row_ids(model, rows)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with mixed_batch(model, torch.tensor(ids, dtype=torch.long, device=device),
                     what=f"batch_adapters block (rows {list(rows)})"):
        yield model
