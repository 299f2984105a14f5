"""How long `transform` takes: capture + discovery (as `plan` runs them: HF models block by block, one capture
per distinct block) and rewrite, for Llama-shaped models of 2, 8 and 32 layers (hidden 512, real weights) and a
Llama-2-7B-shaped model on the meta device (no weights allocated).

    python benchmarks/transform_time.py [--layers 2,8,32] [--no-7b] [--whole]

`--whole` times the whole-model capture instead (one torch.export of the entire model, then discovery).
Target: the 7B-shaped meta model and the 32-layer hidden-512 model each transform in <= 3 s. Appends one CSV
row per model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import amole_compile as ac
from amole_compile.core import rewrite
from amole_compile.passes.discover import analyse, analyse_whole
from amole_compile.passes.select_targets import select_targets

import _common as bc


def llama(layers: int, hidden: int, meta: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig

    kw = dict(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_attention_heads=hidden // 64,
              num_key_value_heads=hidden // 64) if hidden != 4096 else dict(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    cfg = LlamaConfig(vocab_size=32000, num_hidden_layers=layers, **kw)
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg)
    return AutoModelForCausalLM.from_config(cfg)


def timed(model, whole: bool) -> dict[str, float]:
    """Seconds per phase of one transform, each phase run exactly as transform runs it."""
    cfg = ac.AdaMoLEConfig()
    t0 = time.perf_counter()
    found, report = (analyse_whole if whole else analyse)(model, None)
    selected = select_targets(found, cfg, report)
    t1 = time.perf_counter()
    rewrite(model, selected, cfg)
    t2 = time.perf_counter()
    return {"capture+discover": t1 - t0, "rewrite": t2 - t1, "total": t2 - t0, "sites": report.matched,
            "path": "whole" if whole else "blocks"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="2,8,32")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--no-7b", action="store_true")
    ap.add_argument("--whole", action="store_true", help="capture the whole model in one torch.export")
    args = ap.parse_args()
    models = [(f"llama h{args.hidden} x{n}", int(n), args.hidden, False) for n in args.layers.split(",")]
    if not args.no_7b:
        models.append(("llama-2-7b shape (meta)", 32, 4096, True))
    rows, dev = [], bc.device_name("cpu")
    for name, layers, hidden, meta in models:
        torch.manual_seed(0)
        t = timed(llama(layers, hidden, meta), args.whole)
        rows.append([name, t["path"], t["sites"], f"{t['capture+discover']:.2f}", f"{t['rewrite']:.2f}",
                     f"{t['total']:.2f}"])
        bc.append_row("transform_time", {"device": dev, "model": name,
                                         **{k: round(v, 3) if isinstance(v, float) else v for k, v in t.items()}})
    print(f"transform time (capture + discover + rewrite), {dev}")
    print(bc.table(rows, ["model", "capture", "role sites", "capture+discover s", "rewrite s", "total s"]))


if __name__ == "__main__":
    main()
