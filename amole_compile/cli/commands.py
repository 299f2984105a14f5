"""`amole-compile`: demo, inspect, train, generate, stats, export, bench.

Errors print one line (`amole-compile: error: ...`) and exit non-zero; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

from .checks import CLIError, check, model_dir
from .parser import parser


def _config(args):
    from ..config import AdaMoLEConfig

    extra = {"alpha": args.alpha} if getattr(args, "alpha", None) is not None else {}
    return AdaMoLEConfig(method=args.method, num_experts=args.experts, rank=args.rank,
                         roles=tuple(r.strip() for r in args.roles.split(",") if r.strip()),
                         include=args.include, exclude=args.exclude, **extra)


def cmd_inspect(args) -> int:
    """Discover the targets of a saved HF model without loading its weights (the model is built on meta)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from ..core import plan

    path = model_dir(args.model_dir)
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CLIError(f"{path}: cannot read config.json: {str(exc).splitlines()[0]}") from exc
    config = _config(args)
    say(f"capturing {hf_config.model_type} (built on the meta device, no weights loaded) ...")
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(hf_config)
        except ValueError:
            model = AutoModel.from_config(hf_config)
    p = plan(model, config)
    found, report = p.targets, p.report
    print(f"{type(model).__name__} ({hf_config.model_type}): {report.anchors} attention site(s), "
          f"{len(found)} projection(s), {sum(len(t.roles) for t in found)} role site(s) selected by --roles, "
          f"--include and --exclude (of {report.matched} found)")
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

    model = load_with_adapters(model_dir(args.model_dir), args.adapter_dir)
    model.eval()
    ids = _stats_inputs(args, model)
    if not args.text:
        say(f"no --text: these statistics are of {args.batch} x {args.seq} random token ids (seed {args.seed}), "
            "not of your data")
    with torch.no_grad():
        model(input_ids=ids)
    what = "--text" if args.text else f"random token ids (seed {args.seed})"
    stats = expert_stats(model).over(f"one pass over {what}: {ids.shape[0]} x {ids.shape[1]} tokens")
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
    from .load import export_from_dirs

    what = "a genai folder" if args.genai else ("a KV-cache decoder" if args.kv_cache else "a scoring graph")
    say(f"exporting {args.model_dir} with the adapters of {args.adapter_dir} as {what} (capture and translation: "
        "about a minute on CPU) ...")
    out = export_from_dirs(model_dir(args.model_dir), args.adapter_dir, args.out, kv_cache=args.kv_cache,
                           opset=args.opset, genai=args.genai, adapters=_names(args.adapters))
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

    model_dir(args.model_dir)
    if "datasets" in sys.modules:  # imported before main() set HF_DATASETS_DISABLE_PROGRESS_BARS
        sys.modules["datasets"].disable_progress_bars()
    summary = run_train(args, _config(args))
    for key, value in summary.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def cmd_generate(args) -> int:
    """`amole-compile generate MODEL_DIR ADAPTERS --prompt ...`: generate with a trained adapter."""
    from .train import run_generate

    print(run_generate(model_dir(args.model_dir), args.adapters, args.prompt, args.max_new_tokens, args.quantize,
                       max_length=args.max_length, sample=args.sample, temperature=args.temperature,
                       top_p=args.top_p, seed=args.seed))
    return 0


def cmd_demo(args) -> int:
    """`amole-compile demo`: train, export and serve a small model built from config."""
    from .demo import run_demo

    return run_demo(args)


COMMANDS = {"demo": cmd_demo, "inspect": cmd_inspect, "stats": cmd_stats, "export": cmd_export, "train": cmd_train,
            "generate": cmd_generate, "bench": cmd_bench}


def say(line: str) -> None:
    """A progress line before a long phase (stdout, flushed)."""
    print(line, flush=True)


def _ours(message: warnings.WarningMessage) -> bool:
    """A warning amole_compile raised (its own category, or a message of ours), not a library's."""
    return type(message.message).__module__.startswith("amole_compile") or str(message.message).startswith("amole")


def _run(args) -> int:
    """The command, with library warnings and log lines hidden and ours shown in one line each."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read at datasets' import
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # libraries log while they import (torchao's C extensions, pytree)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if args.command != "bench":
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()  # "Loading weights" bars would clutter the output
            return COMMANDS[args.command](args)
    finally:
        logging.disable(previous)
        for w in dict.fromkeys(str(c.message) for c in caught if _ours(c)):
            print(f"amole-compile: warning: {w.removeprefix('amole_compile: ').removeprefix('amole: ')}",
                  file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point: check the arguments (before any heavy import), then run one command; errors print one line
    and library warnings are hidden (`--debug` shows the traceback and every warning)."""
    args = parser().parse_args(argv)
    if args.debug:
        check(args)
        return COMMANDS[args.command](args)
    try:
        check(args)
        return _run(args)
    except KeyboardInterrupt:
        print("amole-compile: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, not a traceback (--debug shows it)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"amole-compile: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
