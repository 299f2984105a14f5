"""Import of the upstream AdaMoLE repository's checkpoints (the upstream format, docs/upstream_format.md).

`adapter_config.json` with `peft_type` ADAMOLE / MOLE / LORA, `lora_rank` (per expert; PEFT's own LoRA writes
`r`), `lora_alpha`, `lora_dropout`, `num_experts`, `max_threshold` (AdaMoLE) or `top_k` (MoLE), `target_modules`;
tensors in `adapter_model.bin` (a torch.save dict, loaded with weights_only=True; what upstream writes) or
`adapter_model.safetensors`:

    base_model.model.<fqn>.lora_A.<e>.weight       [r, d_in]     (LoRA: lora_A.weight)
    base_model.model.<fqn>.lora_B.<e>.weight       [d_out, r]    (LoRA: lora_B.weight)
    base_model.model.<fqn>.lora_gating.weight      [E, d_in]     (AdaMoLE, MoLE)
    base_model.model.<fqn>.lora_threshold.weight   [1, d_in]     (AdaMoLE)
    base_model.model.<fqn>.lora_threshold.bias     [1]           (AdaMoLE)

Duplicate `...moe_layer...` keys are ignored. Each upstream module becomes a single-role target; the experts are
stacked into our `lora_A [E*r, d_in]` / `lora_B [d_out, E*r]`. MoLE with a fixed `threshold` (upstream's
`ThresholdMoeLayer`) has no equivalent here and is refused, never imported as top-k.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import torch

from ..config import ROLES, AdaMoLEConfig
from ..kernels.methods import METHODS
from ..passes.targets import Target, expand

PREFIX = "base_model.model."
_METHODS = {m.upstream_type: m.name for m in METHODS.values()}
_KEY = re.compile(r"^base_model\.model\.(?P<mod>.+?)\.(?:(?P<ab>lora_[AB])(?:\.(?P<e>\d+))?\.weight|"
                  r"lora_gating\.weight|lora_threshold\.(?P<tp>weight|bias))$")


def is_upstream(data: dict) -> bool:
    """Is this `adapter_config.json` the upstream repository's (or PEFT's) format?"""
    return "peft_type" in data


# PEFT LoRA options that change the math in ways our adapters do not express: rejected, never imported wrongly
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) adds a learned magnitude vector and renormalises the weight",
    "rank_pattern": "rank_pattern gives modules different ranks; one rank per model is supported",
    "alpha_pattern": "alpha_pattern gives modules different scales; one alpha per model is supported",
    "lora_bias": "lora_bias adds a bias to lora_B",
    "modules_to_save": "modules_to_save holds full copies of other modules (e.g. the LM head)",
    "trainable_token_indices": "trainable_token_indices trains embedding rows",
    "use_qalora": "QA-LoRA pools the input",
}


def _reject_unsupported(data: dict, file: Path) -> None:
    for key, why in _UNSUPPORTED.items():
        if data.get(key):
            raise ValueError(f"{file}: {key}={data[key]!r} is not supported ({why}); only plain LoRA / rsLoRA "
                             "adapters can be imported exactly")
    init = data.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "eva", "loftq")):
        raise ValueError(f"{file}: init_lora_weights={init!r} changes the base weights it was trained on; only "
                         "adapters over an unchanged base can be imported")


def _rank_alpha(data: dict, file: Path) -> tuple[int, float]:
    """The per-expert rank and alpha. Upstream writes `lora_rank`, PEFT writes `r`: either is read (both must
    agree). Both write `lora_alpha`; a config without it names no scale, so it is refused, not guessed."""
    ranks = {k: data[k] for k in ("lora_rank", "r") if data.get(k) is not None}
    if not ranks:
        raise ValueError(f"{file}: missing key 'lora_rank' (the upstream code's name for the per-expert rank; "
                         "PEFT's LoRA writes 'r')")
    if len(ranks) > 1 and ranks["lora_rank"] != ranks["r"]:
        raise ValueError(f"{file}: lora_rank={ranks['lora_rank']!r} and r={ranks['r']!r} disagree")
    if data.get("lora_alpha") is None:
        raise ValueError(f"{file}: missing key 'lora_alpha' (the upstream code and PEFT always write it)")
    rank, alpha = int(next(iter(ranks.values()))), float(data["lora_alpha"])
    if data.get("use_rslora"):
        # rsLoRA scales by alpha / sqrt(r); ours is alpha' / r, so alpha' = alpha * sqrt(r)
        alpha = alpha * math.sqrt(rank)
    return rank, alpha


def _mole_top_k(data: dict, file: Path) -> int:
    """MoLE's top_k. Upstream's MoLE routes by `top_k` (TopKMoeLayer) or, with `top_k` null, by a fixed
    `threshold` (ThresholdMoeLayer: every expert whose probability is >= threshold). The latter is refused."""
    top_k, threshold = data.get("top_k"), data.get("threshold")
    if threshold is not None:
        raise ValueError(
            f"{file}: MOLE with threshold={threshold!r} (top_k={top_k!r}) is the upstream ThresholdMoeLayer, "
            f"which keeps every expert whose gate probability is >= {threshold!r}; amole_compile's MoLE routes "
            "to the top-k experts, and importing this checkpoint as top-k would change its outputs, so it is "
            "not imported")
    if top_k is None:
        raise ValueError(f"{file}: MOLE with neither top_k nor threshold (the upstream code refuses this too)")
    return top_k


def _config(data: dict, file: Path) -> AdaMoLEConfig:
    peft_type = str(data.get("peft_type", "")).upper()
    if peft_type not in _METHODS:
        raise ValueError(f"{file}: peft_type {data.get('peft_type')!r} is not one of {sorted(_METHODS)}")
    method = _METHODS[peft_type]
    spec = METHODS[method]
    _reject_unsupported(data, file)
    rank, alpha = _rank_alpha(data, file)
    return AdaMoLEConfig(
        method=method, num_experts=int(data.get("num_experts", 1)) if spec.fixed_experts is None else None,
        rank=rank, alpha=alpha, dropout=float(data.get("lora_dropout", 0.0)),
        max_threshold=data.get("max_threshold") if spec.has_threshold else None,
        top_k=_mole_top_k(data, file) if spec.uses_top_k else None)


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    st, bin_ = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st)), st
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{st} is not a readable safetensors file: {exc}") from exc
    if bin_.is_file():
        try:
            obj = torch.load(bin_, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{bin_} could not be loaded with torch.load(weights_only=True): {exc}") from exc
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"{bin_} does not hold a dict of tensors")
        return obj, bin_
    raise FileNotFoundError(f"neither {st.name} nor {bin_.name} found in {path}")


def _group(raw: dict[str, torch.Tensor], file: Path) -> dict[str, dict[str, dict]]:
    """Parse keys: module -> {'lora_A': {e: t}, 'lora_B': {e: t}, 'gate': t, 'threshold_weight': t, ...}."""
    mods: dict[str, dict] = {}
    for key, value in raw.items():
        if ".moe_layer." in key:
            continue  # duplicates of the expert weights
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{file}: unexpected key {key!r}")
        entry = mods.setdefault(m["mod"], {"lora_A": {}, "lora_B": {}})
        if m["ab"]:
            entry[m["ab"]][None if m["e"] is None else int(m["e"])] = value
        elif m["tp"]:
            entry[f"threshold_{m['tp']}"] = value
        else:
            entry["gate"] = value
    return mods


def _stack(parts: dict, name: str, mod: str, config: AdaMoLEConfig, file: Path) -> list[torch.Tensor]:
    ids = [None] if config.spec.fixed_experts == 1 else list(range(config.num_experts))
    for e in ids:
        if e not in parts:
            suffix = f"{name}.weight" if e is None else f"{name}.{e}.weight"
            raise ValueError(f"{file}: missing key {PREFIX}{mod}.{suffix!r}")
    extra = sorted(set(parts) - set(ids), key=str)
    if extra:
        raise ValueError(f"{file}: {PREFIX}{mod}.{name} has unexpected expert index {extra[0]}")
    return [parts[e] for e in ids]


def _convert(mod: str, entry: dict, config: AdaMoLEConfig, file: Path) -> tuple[Target, dict[str, torch.Tensor]]:
    a = _stack(entry["lora_A"], "lora_A", mod, config, file)
    b = _stack(entry["lora_B"], "lora_B", mod, config, file)
    shapes = {t.shape for t in a}
    if len(shapes) != 1 or len({t.shape for t in b}) != 1:
        raise ValueError(f"{file}: the experts of {mod} have different shapes: {sorted(map(tuple, shapes))}")
    d_in, d_out = a[0].shape[1], b[0].shape[0]
    out = {"lora_A": torch.cat(a, 0), "lora_B": torch.cat(b, 1)}
    wanted = (("gate",) if config.spec.has_gate else ()) + \
        (("threshold_weight", "threshold_bias") if config.spec.has_threshold else ())
    for name in ("gate", "threshold_weight", "threshold_bias"):
        if name in wanted and name not in entry:
            raw = {"gate": "lora_gating.weight", "threshold_weight": "lora_threshold.weight",
                   "threshold_bias": "lora_threshold.bias"}[name]
            raise ValueError(f"{file}: missing key {PREFIX}{mod}.{raw!r}")
        if name in entry and name not in wanted:
            raise ValueError(f"{file}: {mod} has a {name} tensor, which {config.method} checkpoints do not have")
        if name in entry:
            out[name] = entry[name]
    return Target(mod, ("?",), (slice(0, d_out),), d_in, d_out), out


def read_upstream(path: Path, data: dict) -> tuple[AdaMoLEConfig, list[Target], dict[str, torch.Tensor]]:
    """-> (config, targets with role '?' to be matched against discovery, tensors under our canonical keys)."""
    config = _config(data, path / "adapter_config.json")
    raw, file = _load_tensors(path)
    mods = _group(raw, file)
    if not mods:
        raise ValueError(f"{file} holds no adapter tensors")
    targets, tensors = [], {}
    for mod, entry in mods.items():
        target, parts = _convert(mod, entry, config, file)
        targets.append(target)
        tensors.update({f"{mod}.adapters.?.{k}": v for k, v in parts.items()})
    return config, targets, tensors


def resolve_upstream(have: list[Target], config: AdaMoLEConfig, want: list[Target],
                      tensors: dict[str, torch.Tensor]):
    """Give each upstream module the role discovery found for it -> (config, targets, tensors) in our terms.

    Every upstream module must be a discovered, unfused projection (the upstream format adapts a fused QKV
    projection as one layer, which has no per-role equivalent here).
    """
    found = {t.module: t for t in have}
    targets, out = [], {}
    for w in want:
        h = found.get(w.module)
        if h is None:
            raise ValueError(f"the upstream checkpoint adapts {w.module}, which is not an attention projection "
                             "discovered in this model")
        if len(h.roles) != 1 or expand(h.slices[0]) != tuple(range(h.out_features)):
            raise ValueError(f"{w.module} is a fused projection here (roles {h.roles}); the upstream checkpoint "
                             "adapts it as a single layer, which cannot be split into per-role experts")
        targets.append(h)
        prefix = f"{w.module}.adapters.?."
        out.update({f"{w.module}.adapters.{h.roles[0]}.{k[len(prefix):]}": v
                    for k, v in tensors.items() if k.startswith(prefix)})
    roles = tuple(sorted({t.roles[0] for t in targets}, key=ROLES.index))
    include = "^(?:" + "|".join(re.escape(t.module) for t in targets) + ")$"
    return dataclasses.replace(config, roles=roles, include=include), targets, out
