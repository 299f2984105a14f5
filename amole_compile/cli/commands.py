"""`amole-compile`: demo, inspect, train, generate, stats, export, bench.

Errors print one line (`amole-compile: error: ...`) and exit non-zero; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = ("train_step", "layer", "transform_time", "onnx_latency")


class CLIError(Exception):
    """A user-facing error: printed as one line."""


def _at_least(low: int):
    """An argparse type: an integer >= low (argparse names the option in its error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


def _config_args(p: argparse.ArgumentParser) -> None:
    from ..kernels.methods import METHODS

    p.add_argument("--method", default="adamole", choices=tuple(METHODS))
    p.add_argument("--experts", type=int, default=None, help="experts per site (default 8; 1 for lora)")
    p.add_argument("--rank", type=int, default=4, help="rank of each expert")
    p.add_argument("--roles", default="q,k,v,o", help="comma-separated subset of q,k,v,o")
    p.add_argument("--include", default=None, help="regex: only adapt modules whose name matches")
    p.add_argument("--exclude", default=None, help="regex: skip modules whose name matches")


def _config(args):
    from ..config import AdaMoLEConfig

    extra = {"alpha": args.alpha} if getattr(args, "alpha", None) is not None else {}
    return AdaMoLEConfig(method=args.method, num_experts=args.experts, rank=args.rank,
                         roles=tuple(r.strip() for r in args.roles.split(",") if r.strip()),
                         include=args.include, exclude=args.exclude, **extra)


def _model_dir(path: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise CLIError(f"{path} is not a directory")
    if not (p / "config.json").is_file():
        raise CLIError(f"{path} is not a Hugging Face model directory (no config.json)")
    return p


def cmd_inspect(args) -> int:
    """Discover the targets of a saved HF model without loading its weights (the model is built on meta)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from ..core import plan

    path = _model_dir(args.model_dir)
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CLIError(f"{path}: cannot read config.json: {str(exc).splitlines()[0]}") from exc
    config = _config(args)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(hf_config)
        except ValueError:
            model = AutoModel.from_config(hf_config)
    p = plan(model, config)
    found, report = p.targets, p.report
    print(f"{type(model).__name__} ({hf_config.model_type}): {report.anchors} attention site(s), "
          f"{len(found)} projection(s), {report.matched} role site(s)")
    total = 0
    e, r = config.num_experts, config.rank
    for t in found:
        n = sum(e * r * (t.in_features + len(t.columns(role))) + _router_params(config, t.in_features)
                for role in t.roles)
        total += n
        print(f"  {t.describe():<80} {n:>10,} params")
    base = sum(p.numel() for p in model.parameters())
    print(f"adapter parameters: {total:,} ({100 * total / base:.3f}% of {base:,} base parameters)")
    for line in report.skipped:
        print(f"  skipped: {line}")
    return 0


def _router_params(config, d_in: int) -> int:
    return config.spec.router_params(config.num_experts, d_in)


def cmd_stats(args) -> int:
    """Run a saved model with adapters on tokens and print the expert statistics."""
    import torch

    from ..stats import expert_stats, plot_expert_stats
    from .load import load_with_adapters

    model = load_with_adapters(_model_dir(args.model_dir), args.adapter_dir)
    model.eval()
    ids = _stats_inputs(args, model)
    with torch.no_grad():
        model(input_ids=ids)
    stats = expert_stats(model)
    print(stats.table())
    if args.json:
        print(f"statistics: {stats.save(args.json)}")
    if args.plot:
        print(f"plot: {plot_expert_stats(stats, args.plot)}")
    return 0


def _stats_inputs(args, model):
    import torch

    if args.text:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(args.model_dir)
        except (OSError, ValueError) as exc:
            raise CLIError(f"--text needs a tokenizer in {args.model_dir}: {str(exc).splitlines()[0]}") from exc
        return tok(args.text, return_tensors="pt")["input_ids"]
    g = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)


def cmd_export(args) -> int:
    """`amole-compile export`: a saved HF model with adapters -> ONNX."""
    import warnings

    from .load import export_from_dirs

    with warnings.catch_warnings(record=True) as caught:
        out = export_from_dirs(_model_dir(args.model_dir), args.adapter_dir, args.out, kv_cache=args.kv_cache,
                               opset=args.opset, genai=args.genai, adapters=_names(args.adapters))
    for w in caught:  # a genai export without tokenizer files says so in one line
        if w.category.__name__ == "MissingTokenizerWarning":
            print(f"amole-compile: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    print(f"wrote {out}")
    return 0


def _names(text: str | None) -> list[str] | None:
    """'a,b' -> ['a', 'b'] (None stays None)."""
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]


def cmd_bench(args) -> int:
    """`amole-compile bench NAME`: run a benchmark script of a source checkout."""
    root = Path(__file__).resolve().parents[2] / "benchmarks"
    script = root / f"{args.name}.py"
    if not script.is_file() or not (root.parent / "tests" / "upstream_loop.py").is_file():
        raise CLIError(f"'bench' runs the scripts of a source checkout (benchmarks/ and tests/ beside the "
                       f"package), and this installation has none ({root} missing): clone the repository")
    return subprocess.call([sys.executable, str(script), *args.rest])


def cmd_train(args) -> int:
    """`amole-compile train MODEL_DIR DATA`: fine-tune AdaMoLE adapters on a data file with the HF Trainer."""
    from .train import run_train

    _model_dir(args.model_dir)
    if "datasets" in sys.modules:  # imported before main() set HF_DATASETS_DISABLE_PROGRESS_BARS
        sys.modules["datasets"].disable_progress_bars()
    summary = run_train(args, _config(args))
    for key, value in summary.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def cmd_generate(args) -> int:
    """`amole-compile generate MODEL_DIR ADAPTERS --prompt ...`: generate with a trained adapter."""
    from .train import run_generate

    print(run_generate(_model_dir(args.model_dir), args.adapters, args.prompt, args.max_new_tokens, args.quantize))
    return 0


def cmd_demo(args) -> int:
    """`amole-compile demo`: train, export and serve a small model built from config."""
    from .demo import run_demo

    return run_demo(args)


def parser() -> argparse.ArgumentParser:
    """The argument parser of `amole-compile`."""
    ap = argparse.ArgumentParser(prog="amole-compile", description="AdaMoLE adapters as a compiler pass: "
                                 "transform, train under torch.compile, export to ONNX.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser("demo", help="train a small Llama on a synthetic routing task, export and serve it")
    d.add_argument("--out", default="amole_demo", help="output directory (default ./amole_demo)")
    d.add_argument("--steps", type=int, default=400)
    d.add_argument("--hidden", type=int, default=128)
    d.add_argument("--layers", type=int, default=2)
    d.add_argument("--experts", type=int, default=8)
    d.add_argument("--rank", type=int, default=4)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-compile", action="store_true", help="train eagerly instead of with torch.compile")
    d.set_defaults(func=cmd_demo)
    i = sub.add_parser("inspect", help="list the projections a saved HF model would get adapters on")
    i.add_argument("model_dir")
    _config_args(i)
    i.set_defaults(func=cmd_inspect)
    s = sub.add_parser("stats", help="expert statistics of a model with adapters on some tokens")
    s.add_argument("model_dir")
    s.add_argument("adapter_dir")
    s.add_argument("--text", default=None, help="text to run (needs the model directory's tokenizer)")
    s.add_argument("--batch", type=_at_least(1), default=4)
    s.add_argument("--seq", type=_at_least(1), default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", default=None, help="also write the statistics as JSON here")
    s.add_argument("--plot", default=None, help="also draw the heat map to this PNG")
    s.set_defaults(func=cmd_stats)
    e = sub.add_parser("export", help="export a saved HF model with adapters to ONNX")
    e.add_argument("model_dir")
    e.add_argument("adapter_dir")
    e.add_argument("out", help="output .onnx path (with --genai: an output folder)")
    e.add_argument("--kv-cache", action="store_true", help="decoder graph with past/present KV")
    e.add_argument("--genai", action="store_true", help="a folder onnxruntime-genai serves: the KV-cache decoder, "
                   "genai_config.json and the model directory's tokenizer files")
    e.add_argument("--adapters", default=None, help="comma-separated adapter names of ADAPTER_DIR to stack in one "
                   "graph with an adapter_ids input (with --genai: to write as .onnx_adapter files)")
    e.add_argument("--opset", type=int, default=None)
    e.set_defaults(func=cmd_export)
    t = sub.add_parser("train", help="train adapters on your data (JSONL/CSV/Parquet or a saved HF dataset)")
    t.add_argument("model_dir", help="a Hugging Face model directory (config.json, weights, tokenizer)")
    t.add_argument("data", help="a .jsonl/.json/.csv/.parquet file or a datasets.save_to_disk directory with a "
                   "'text' field or 'prompt' and 'response' fields")
    t.add_argument("--out", default="amole_train", help="output directory: checkpoints, adapters, statistics")
    _config_args(t)
    t.add_argument("--alpha", type=float, default=16.0)
    t.add_argument("--quantize", choices=("4bit", "8bit"), default=None, help="load the base with bitsandbytes")
    t.add_argument("--compile", action="store_true", help="train under torch.compile")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--steps", type=_at_least(0), default=0, help="stop after this many steps (overrides --epochs)")
    t.add_argument("--batch", type=_at_least(1), default=8)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--max-length", type=_at_least(2), default=512)
    t.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share for eval loss / accuracy")
    t.add_argument("--save-steps", type=_at_least(1), default=200, help="checkpoint (and eval) every this many steps")
    t.add_argument("--logging-steps", type=_at_least(1), default=10)
    t.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
    t.add_argument("--text-field", default="text")
    t.add_argument("--prompt-field", default="prompt")
    t.add_argument("--response-field", default="response")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)
    g = sub.add_parser("generate", help="generate text with a model directory and trained adapters")
    g.add_argument("model_dir")
    g.add_argument("adapters", help="directory with amole_config.json + adapters.safetensors")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=_at_least(1), default=32)
    g.add_argument("--quantize", choices=("4bit", "8bit"), default=None)
    g.set_defaults(func=cmd_generate)
    b = sub.add_parser("bench", help="run a benchmark script (prints a table, appends a CSV row)")
    b.add_argument("name", choices=BENCHMARKS)
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the script")
    b.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point: run one command; errors print one line (`--debug` shows the traceback)."""
    args = parser().parse_args(argv)
    if args.debug:
        return args.func(args)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read at datasets' import
    # Libraries log warnings while they import (torchao's optional C extensions, torch's pytree registry): in
    # one-line mode only errors are logged; --debug shows everything.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        if args.command != "bench":
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # "Loading weights" bars would clutter the one-line errors
        return args.func(args)
    except KeyboardInterrupt:
        print("amole-compile: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, not a traceback (--debug shows it)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"amole-compile: error: {msg}", file=sys.stderr)
        return 1
    finally:
        logging.disable(previous)


if __name__ == "__main__":
    sys.exit(main())
