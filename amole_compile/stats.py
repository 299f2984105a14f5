"""Expert statistics (the paper's Figures 2 and 3): how many experts each token activates, per site.

Every `ExpertSet` counts, over the forwards since the last `reset_expert_stats`, the tokens it saw, how many of
them selected each expert, and the histogram of active experts per token. What is counted is stated with the
numbers (`ExpertStats.scope`):

- **which forwards**: eval-mode forwards (`model.eval()`) by default, the routing of the model as it serves;
  `reset_expert_stats(model, passes="train")` counts training-mode forwards instead (dropout on, weights
  moving), `passes="all"` both;
- **which tokens**: the real ones. A forward given a 2-D `attention_mask` counts only the tokens it marks
  (`model/tokens.py`); without one every token counts;
- **which window**: what the caller says it ran (`ExpertStats.over(...)`), e.g. "one pass over the eval set".
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from torch import nn

from .config import ROLES
from .files import atomic_write
from .model.modules import PASSES, expert_sets
from .model.state import adapter_groups


@dataclasses.dataclass(frozen=True)
class SiteStats:
    """One (module, role) site. `active_histogram[k]` is the fraction of tokens with exactly k experts active."""

    module: str
    role: str
    layer: int | None
    tokens: int
    mean_active: float
    active_histogram: tuple[float, ...]
    selection_fraction: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class ExpertStats:
    """Expert statistics of every site of a model, from `expert_stats(model)`: `passes` the forwards counted
    ("eval", "train", "all", or "mixed" when sites differ), `window` what the caller ran (free text)."""
    sites: tuple[SiteStats, ...]
    passes: str = "eval"
    window: str = ""

    @property
    def scope(self) -> str:
        """One line: which forwards and tokens were counted, and over what window."""
        what = {"eval": "eval-mode forwards", "train": "training-mode forwards (dropout on)",
                "all": "eval- and training-mode forwards"}.get(self.passes, "forwards of each site's own setting")
        line = f"counted: {what} since the last reset, real tokens only (those the attention_mask marks)"
        return f"{line}; {self.window}" if self.window else line

    def over(self, window: str) -> ExpertStats:
        """The same statistics, saying what window they cover (e.g. "one pass over the eval set")."""
        return dataclasses.replace(self, window=window)

    @property
    def mean_active(self) -> float:
        """Token-weighted mean of active experts over all sites."""
        total = sum(s.tokens for s in self.sites)
        return sum(s.mean_active * s.tokens for s in self.sites) / total if total else 0.0

    def to_dict(self) -> dict:
        """A JSON-ready dict: the overall mean and every site."""
        return {"scope": {"passes": self.passes, "tokens": "real (attention_mask)", "window": self.window,
                          "text": self.scope},
                "mean_active": self.mean_active, "sites": [dataclasses.asdict(s) for s in self.sites]}

    def save(self, path: str | Path) -> Path:
        """Write the statistics as JSON, atomically; returns the path."""
        path = Path(path)
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(self.to_dict(), indent=2)))
        return path

    def table(self) -> str:
        """A text table: one line per site, then the overall mean."""
        lines = [self.scope]
        if not any(s.tokens for s in self.sites) and self.passes == "eval":
            lines.append("no token counted yet: run the model in eval mode, or count training forwards with "
                         "reset_expert_stats(model, passes='train')")
        lines.append(f"{'module':<48} {'role':<4} {'tokens':>8} {'mean active':>11}  selection fraction per expert")
        for s in self.sites:
            frac = " ".join(f"{f:.2f}" for f in s.selection_fraction)
            lines.append(f"{s.module:<48} {s.role:<4} {s.tokens:>8} {s.mean_active:>11.2f}  {frac}")
        lines.append(f"overall mean active experts per token: {self.mean_active:.2f}")
        return "\n".join(lines)


def _layer_of(module: str) -> int | None:
    m = re.search(r"\.(\d+)\.", f".{module}.")
    return int(m.group(1)) if m else None


def expert_stats(model: nn.Module, adapter_name: str | None = None) -> ExpertStats:
    """Per site of adapter `adapter_name` (default: the active one): tokens seen, mean active experts per
    token, its histogram, each expert's selection fraction."""
    sites, passes = [], set()
    for name, group in adapter_groups(model, adapter_name):
        for role, site in group.items():
            passes.add(getattr(site, "stat_passes", "all"))
            n = int(site.stat_tokens.item())
            hist = site.stat_active.double()
            sel = site.stat_selected.double()
            levels = sum(k * float(c) for k, c in enumerate(hist.tolist()))
            sites.append(SiteStats(name, role, _layer_of(name), n, levels / n if n else 0.0,
                                   tuple((hist / n).tolist()) if n else tuple(0.0 for _ in hist),
                                   tuple((sel / n).tolist()) if n else tuple(0.0 for _ in sel)))
    return ExpertStats(tuple(sites), next(iter(passes)) if len(passes) == 1 else "mixed" if passes else "eval")


def reset_expert_stats(model: nn.Module, passes: str | None = None) -> None:
    """Zero the expert statistics counters of every site of every adapter of `model`; `passes` ("eval", the
    default of a new site; "train"; or "all") sets which forwards they count from now on (None: unchanged)."""
    if passes is not None and passes not in PASSES:
        raise ValueError(f"passes must be one of {PASSES}, got {passes!r}")
    for site in expert_sets(model):
        site.reset_stats()
        if passes is not None:
            site.stat_passes = passes


def plot_expert_stats(stats: ExpertStats, path: str | Path, title: str | None = None) -> Path:
    """Heat map of mean active experts (layer x role) beside the per-layer mean (paper Figs. 2-3), as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plot_expert_stats needs matplotlib: pip install 'amole-compile[plot]'") from exc
    layers = sorted({s.layer for s in stats.sites if s.layer is not None}) or [0]
    roles = [r for r in ROLES if any(s.role == r for s in stats.sites)]  # attention, then feed-forward roles
    grid = [[float("nan")] * len(roles) for _ in layers]
    for s in stats.sites:
        grid[layers.index(s.layer if s.layer is not None else 0)][roles.index(s.role)] = s.mean_active
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 0.35 * len(layers) + 2.5))
    im = ax1.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(
        (len(s.active_histogram) - 1 for s in stats.sites), default=1))
    ax1.set_xticks(range(len(roles)), roles)
    ax1.set_yticks(range(len(layers)), [str(lay) for lay in layers])
    ax1.set_xlabel("projection")
    ax1.set_ylabel("layer")
    ax1.set_title("mean active experts per token")
    fig.colorbar(im, ax=ax1)
    per_layer = [sum(v for v in row if v == v) / max(1, sum(1 for v in row if v == v)) for row in grid]
    ax2.plot(layers, per_layer, marker="o")
    experts = max((len(s.active_histogram) - 1 for s in stats.sites), default=1)
    ax2.set_ylim(0, max(experts, 1))  # 0..E experts: a fixed scale, so small differences look small
    ax2.set_xticks(layers)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("mean active experts")
    ax2.set_title("per-layer mean")
    ax2.grid(alpha=0.3)
    fig.suptitle(title or "AdaMoLE expert statistics")
    fig.text(0.5, 0.005, stats.scope, ha="center", va="bottom", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))  # room for the scope line
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path
