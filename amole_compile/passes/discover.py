"""Discovery, end to end: capture -> find -> replay -> select, a model in and a `Plan` out.

    capture   passes/capture.py: the whole model, or each distinct block once (HF models with layer lists)
    find      find_attention.py on the captured graph, then find_mlp.py when feed-forward roles are asked for
    replay    a block's targets replayed, names re-prefixed, on every identical block
    select    select_targets.py: the config's roles, include and exclude; nothing left raises

HF models with layer lists are captured block by block (one capture per distinct block); other modules whole,
block by block only when the whole model does not export. A quantized model is planned on its unquantized
twin (`integrations/quantized.py`); a model another adapter library has adapted is refused
(`integrations/foreign.py`). The model is not changed.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter

from torch import fx, nn

from ..config import MLP_ROLES, ROLES, AdaMoLEConfig
from ..integrations import quantized
from ..integrations.foreign import check_not_adapted_elsewhere
from ..model.modules import linear_features
from ._fx import GraphView, ParamNames
from .capture import CaptureError, capture, capture_blocks, find_blocks
from .find_attention import find_attention
from .find_mlp import find_mlp
from .reach import reach
from .select_targets import check_found, check_reachable, select_targets
from .targets import PassReport, Plan, Skip, Target


def discover(model: nn.Module, config: AdaMoLEConfig, example_inputs=None, refuse: bool = True) -> Plan:
    """The `Plan` `config` selects on `model` (see the module doc). `refuse`: raise `DeadAdapterError` for
    selected projections no adapter would reach (transform); without it (plan) they are listed as skipped."""
    check_not_adapted_elsewhere(model)
    if not isinstance(model, fx.GraphModule) and quantized.library(model) is not None:
        twin = discover(quantized.twin(model), config, example_inputs, refuse)  # quantized layers do not trace
        return Plan(type(model).__name__, list(twin.targets), twin.report)
    found, report = analyse(model, example_inputs, mlp=any(r in MLP_ROLES for r in config.roles))
    _warn_unanalysed(model, report)
    selected = select_targets(found, config, report)
    check_found(type(model).__name__, report, selected, config)
    if refuse:
        check_reachable(type(model).__name__, report, config)
    return Plan(type(model).__name__, list(selected), report)


def _warn_unanalysed(model: nn.Module, report: PassReport) -> None:
    """Warn, naming them, about modules that did not export (`not_captured`), hold two or more projections of
    their own, and had none found inside: their projections get no adapters, and only `plan(...).describe()`
    said so (Qwen2-VL's vision attention, whose `cu_seqlens` split depends on values). An MoE block that does not
    export holds one projection of its own, its router, and is not named."""
    modules = dict(model.named_modules())
    found = [t.module for t in report.targets]
    unseen, why = [], ""
    for skip in report.skipped:
        module = modules.get(skip.module) if skip.reason == "not_captured" else None
        if module is None or sum(linear_features(c) is not None for c in module.children()) < 2:
            continue
        if not any(t == skip.module or t.startswith(skip.module + ".") for t in found):
            unseen.append(skip.module)
            why = why or skip.detail.partition("(")[2].partition(":")[0]  # the error's type
    if unseen:
        listed = ", ".join(unseen[:4]) + (f" and {len(unseen) - 4} more" if len(unseen) > 4 else "")
        warnings.warn(f"amole_compile: {len(unseen)} module(s) of {type(model).__name__} did not export for "
                      f"analysis ({why}), so the projections inside get no adapters: {listed}", stacklevel=3)


def find_targets(graph: fx.Graph, params: ParamNames, mlp: bool = False,
                 swapped: bool = True) -> tuple[list[Target], PassReport]:
    """The find step on one graph: attention projections, then (`mlp`) feed-forward ones, all in the order of
    their first call; projections called more than once (ALBERT's shared layer) are listed in `report.shared`.
    `swapped` (an nn.Module's graph, adapted by swapping modules): projections no swapped module would reach are
    skipped (`reach.py`)."""
    g = GraphView(graph, params)
    targets, report = find_attention(g)
    if mlp:
        ffn, skipped = find_mlp(g, {t.module for t in targets})
        first = g.first_call()
        targets = sorted(targets + ffn, key=lambda t: first[t.module])
        report.skipped += skipped
    if swapped:
        targets, unreachable = reach(g, targets)
        report.skipped += unreachable
    calls = Counter((c.module, c.rows) for c in map(g.projection, graph.nodes) if c is not None)
    most = {}  # module -> the most calls of one set of its lines (MHA's q and kv thirds are one call each)
    for (module, _), n in calls.items():
        most[module] = max(most.get(module, 0), n)
    report.shared = {t.module: most[t.module] for t in targets if most.get(t.module, 0) > 1}
    report.targets = targets
    return targets, report


def analyse(model: nn.Module, example_inputs, mlp: bool = False) -> tuple[list[Target], PassReport]:
    """Capture and find: block by block for HF models with layer lists, else the whole model (see the module
    doc)."""
    if isinstance(model, fx.GraphModule):
        return find_targets(model.graph, ParamNames(model), mlp, swapped=False)
    has_blocks = bool(find_blocks(model))
    if not (has_blocks and getattr(model, "config", None) is not None):
        try:
            return analyse_whole(model, example_inputs, mlp)
        except CaptureError:
            if not has_blocks:
                raise
            return analyse_blocks(model, example_inputs, mlp)
    try:
        found, report = analyse_blocks(model, example_inputs, mlp)
    except CaptureError:
        return analyse_whole(model, example_inputs, mlp)
    return (found, report) if report.anchors else analyse_whole(model, example_inputs, mlp)


def analyse_whole(model: nn.Module, example_inputs, mlp: bool = False) -> tuple[list[Target], PassReport]:
    """Capture the whole model and find its targets."""
    ep = capture(model, example_inputs)
    return find_targets(ep.graph, ParamNames.of_export(ep), mlp)


def analyse_blocks(model: nn.Module, example_inputs, mlp: bool = False) -> tuple[list[Target], PassReport]:
    """Find the targets of each distinct block's capture and replay them on the blocks like it."""
    groups = capture_blocks(model, example_inputs)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    report, found, seen = PassReport("find_attention"), [], set()
    for group in groups:
        if group.program is None:
            instead = "; its submodules were captured instead" if group.split else ""
            report.skipped += [Skip(name, "not_captured", f"not captured ({group.error}){instead}")
                               for name in group.names]
            report.blocks.update({name: f"not captured{instead}" for name in group.names})
            continue
        targets, rep = find_targets(group.program.graph, ParamNames.of_export(group.program), mlp)
        report.anchors += rep.anchors * sum(group.calls.get(name, 1) for name in group.names)
        for name in group.names:
            _replay(report, name, group, targets, rep)
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


def _replay(report: PassReport, name: str, group, targets: list[Target], rep: PassReport) -> None:
    """Record block `name`, one of `group`, with what its group's capture found (`targets`, `rep`)."""
    roles = [r for r in ROLES if any(r in t.roles for t in targets)]
    found_here = f"{rep.anchors} attention site(s); roles {' '.join(roles) or 'none'}; {len(rep.skipped)} skipped"
    if name != group.names[0]:
        found_here += f" (analysis of {group.names[0]} replayed)"
    report.add_block(name, found_here, [f"{name}.{t.module}" for t in targets], group.calls.get(name, 1))
    report.skipped += [s.within(name) for s in rep.skipped]
