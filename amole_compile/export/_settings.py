"""The per-site settings one genai graph bakes in for every adapter it serves (`genai.py`, `adapters=[...]`).

The adapters' tensors are graph inputs, but each site's method, number of experts, top-k, threshold cap and scale
(alpha / rank) are constants of the graph, traced from the first adapter. So:
- an adapter whose method, E, top-k or cap differs at a site cannot use the graph: a ValueError names the site
  and the setting (before, it was served with the first adapter's settings, with no error);
- an adapter whose scale differs has it folded into its lora_B (s * h Bᵀ = h (s B)ᵀ, exact up to rounding): its
  tensors are written with B * (its scale / the graph's).
The graph keeps its settings in the ONNX model's metadata (`SETTINGS_KEY`), for `genai.add_adapter`.
"""

from __future__ import annotations

import json
import re

import torch
from torch import nn

INPUT_PREFIX = "amole."
SETTINGS_KEY = "amole.adapter_settings"
FIXED = ("method", "num_experts", "top_k", "max_threshold")  # constants of the graph an adapter must share


def input_name(param: str) -> str:
    """`<module>.adapters.<name>.<role>.<param>` -> the graph input `amole.<module>.<role>.<param>` (no adapter
    name: every adapter feeds the same inputs)."""
    return INPUT_PREFIX + re.sub(r"\.adapters\.[^.]+\.", ".", param, count=1)


def site_settings(model: nn.Module, name: str) -> dict[str, dict]:
    """Adapter `name`'s settings per site, keyed by the site's graph input prefix (`input_name` of a parameter,
    less the parameter: `amole.<module>.<role>`): method, num_experts, top_k, max_threshold and scale."""
    from ..model.state import adapter_state

    out: dict[str, dict] = {}
    for key in adapter_state(model, [name]):
        site = input_name(key).rsplit(".", 1)[0]
        if site not in out:
            module = model.get_submodule(key.rsplit(".", 1)[0])
            out[site] = {k: getattr(module, k) for k in (*FIXED, "scale")}
    return out


def fit(tensors: dict[str, torch.Tensor], settings: dict[str, dict], graph: dict[str, dict], name: str,
        where: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s `tensors` ({parameter name: tensor}, its per-site `settings`) for a graph traced with
    `graph`'s settings (`where` names the graph in errors): a ValueError at the first site whose fixed settings
    differ; lora_B scaled by the adapter's scale over the graph's where they differ (a new tensor)."""
    for site, want in graph.items():
        have = settings.get(site)
        for key in FIXED if have is not None else ():
            if have[key] != want[key]:
                raise ValueError(f"adapter {name!r} cannot be served by {where}: its {key} at {site} is {have[key]!r}, "
                                 f"the graph's is {want[key]!r} (a constant of the graph; export it separately)")
    out = dict(tensors)
    for key, t in tensors.items():
        site = input_name(key).rsplit(".", 1)[0]
        if key.endswith(".lora_B") and site in graph and settings[site]["scale"] != graph[site]["scale"]:
            out[key] = t * (settings[site]["scale"] / graph[site]["scale"])
    return out


def write_settings(onnx_model, graph: dict[str, dict]) -> None:
    """Keep the graph's settings in an `onnx_ir.Model`'s metadata."""
    onnx_model.metadata_props[SETTINGS_KEY] = json.dumps(graph)  # (in the model's order: errors name its first site)


def read_settings(proto) -> dict[str, dict] | None:
    """The settings an exported graph (an `onnx.ModelProto`) keeps (None: a graph exported before they were
    kept)."""
    props = {p.key: p.value for p in proto.metadata_props}
    return json.loads(props[SETTINGS_KEY]) if SETTINGS_KEY in props else None
