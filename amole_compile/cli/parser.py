"""The argument parser of `amole-compile`: every option with help text and its default shown in `--help`.

Imports nothing heavy (the method names come from `kernels/methods.py`, which imports no torch), so that
`amole-compile --help` and argument errors come back at once.
"""

from __future__ import annotations

import argparse

BENCHMARKS = ("train_step", "layer", "transform_time", "onnx_latency")
QUANTIZE = ("4bit", "8bit")


class _Parser(argparse.ArgumentParser):
    """Errors in one line, as every other error of the command (exit status 2, argparse's)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown after each help text, but not "(default: None)" nor for flags."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def at_least(low: int):
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

    p.add_argument("--method", default="adamole", choices=tuple(METHODS), help="routing method")
    p.add_argument("--experts", type=at_least(1), default=None, help="experts per site (8; 1 for lora)")
    p.add_argument("--rank", type=at_least(1), default=4, help="rank of each expert")
    p.add_argument("--roles", default="q,k,v,o", help="comma-separated roles: q,k,v,o, gate,up,down, or mlp / all")
    p.add_argument("--include", default=None, help="regex: only adapt modules whose name matches")
    p.add_argument("--exclude", default=None, help="regex: skip modules whose name matches")


def _demo(sub) -> None:
    d = sub.add_parser("demo", formatter_class=_Formatter,
                       help="train a small Llama on a synthetic routing task, export and serve it")
    d.add_argument("--out", default="amole_demo", help="output directory")
    d.add_argument("--steps", type=at_least(1), default=400, help="training steps")
    d.add_argument("--hidden", type=at_least(16), default=128, help="hidden size (a multiple of 16)")
    d.add_argument("--layers", type=at_least(1), default=2, help="decoder layers")
    d.add_argument("--experts", type=at_least(1), default=8, help="experts per site")
    d.add_argument("--rank", type=at_least(1), default=4, help="rank of each expert")
    d.add_argument("--seed", type=int, default=0, help="random seed")
    d.add_argument("--no-compile", action="store_true", help="train eagerly instead of with torch.compile")


def _inspect_and_stats(sub) -> None:
    i = sub.add_parser("inspect", formatter_class=_Formatter,
                       help="list the projections a saved HF model would get adapters on")
    i.add_argument("model_dir", help="a Hugging Face model directory (config.json)")
    _config_args(i)
    s = sub.add_parser("stats", formatter_class=_Formatter,
                       help="expert statistics of a model with adapters on some tokens")
    s.add_argument("model_dir", help="a Hugging Face model directory")
    s.add_argument("adapter_dir", help="a folder with amole_config.json + adapters.safetensors")
    s.add_argument("--text", default=None, help="text to run (needs the model directory's tokenizer); without it "
                   "the statistics are of random token ids, and say so")
    s.add_argument("--batch", type=at_least(1), default=4, help="rows of random token ids (without --text)")
    s.add_argument("--seq", type=at_least(1), default=64, help="tokens per row (without --text)")
    s.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    s.add_argument("--json", default=None, help="also write the statistics as JSON here")
    s.add_argument("--plot", default=None, help="also draw the heat map to this PNG")


def _export(sub) -> None:
    e = sub.add_parser("export", formatter_class=_Formatter, help="export a saved HF model with adapters to ONNX")
    e.add_argument("model_dir", help="a Hugging Face model directory")
    e.add_argument("adapter_dir", help="a folder with our adapters (or an upstream AdaMoLE checkpoint)")
    e.add_argument("out", help="output .onnx path (with --genai: an output folder)")
    e.add_argument("--kv-cache", action="store_true", help="decoder graph with past/present KV")
    e.add_argument("--genai", action="store_true", help="a folder onnxruntime-genai serves: the KV-cache decoder, "
                   "genai_config.json and the model directory's tokenizer files")
    e.add_argument("--adapters", default=None, help="comma-separated adapter names of ADAPTER_DIR to stack in one "
                   "graph with an adapter_ids input (with --genai: to write as .onnx_adapter files)")
    e.add_argument("--opset", type=at_least(18), default=None, help="ONNX opset (20 when not given)")


def _train(sub) -> None:
    t = sub.add_parser("train", formatter_class=_Formatter,
                       help="train adapters on your data (JSONL/CSV/Parquet or a saved HF dataset)")
    t.add_argument("model_dir", help="a Hugging Face model directory (config.json, weights, tokenizer)")
    t.add_argument("data", help="a .jsonl/.json/.csv/.parquet file or a datasets.save_to_disk directory with a "
                   "'text' field or 'prompt' and 'response' fields")
    t.add_argument("--out", default="amole_train", help="output directory: checkpoints, adapters, statistics")
    _config_args(t)
    t.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (each expert scaled by alpha / rank)")
    t.add_argument("--quantize", choices=QUANTIZE, default=None, help="load the base with bitsandbytes")
    t.add_argument("--compile", action="store_true", help="train under torch.compile")
    t.add_argument("--epochs", type=float, default=2.0, help="passes over the training records (the paper's 2)")
    t.add_argument("--steps", type=at_least(0), default=0, help="stop after this many steps (overrides --epochs; "
                   "0: use --epochs)")
    t.add_argument("--batch", type=at_least(1), default=8, help="records per device and micro-step")
    t.add_argument("--grad-accum", type=at_least(1), default=1, help="micro-steps per optimizer step (gradient "
                   "accumulation; the paper: 4 x batch 4)")
    t.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (LoRA-style adapters: 1e-4 to "
                   "3e-4; the paper's 1e-4 ran with 200 warmup steps on a large dataset)")
    t.add_argument("--scheduler", default="constant_with_warmup", help="transformers lr_scheduler_type (the "
                   "paper's); e.g. cosine, linear")
    t.add_argument("--warmup-ratio", type=float, default=0.03, help="share of the steps spent warming up")
    t.add_argument("--warmup-steps", type=at_least(0), default=0, help="warmup steps (overrides --warmup-ratio "
                   "when > 0)")
    t.add_argument("--max-length", type=at_least(2), default=512, help="tokens per record (longer ones are cut)")
    t.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share for eval loss / accuracy")
    t.add_argument("--save-steps", type=at_least(1), default=200, help="checkpoint every this many steps")
    t.add_argument("--eval-steps", type=at_least(1), default=None, help="evaluate every this many steps (default: "
                   "--save-steps)")
    t.add_argument("--save-total-limit", type=at_least(1), default=None, help="keep only the newest N checkpoints")
    t.add_argument("--logging-steps", type=at_least(1), default=10, help="log the loss every this many steps")
    t.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
    t.add_argument("--text-field", default="text", help="the field holding the text")
    t.add_argument("--prompt-field", default="prompt", help="the prompt field (no loss on its tokens)")
    t.add_argument("--response-field", default="response", help="the response field")
    t.add_argument("--seed", type=int, default=0, help="random seed (data split, initialisation, dropout)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")


def _generate_and_bench(sub) -> None:
    g = sub.add_parser("generate", formatter_class=_Formatter,
                       help="generate text with a model directory and trained adapters")
    g.add_argument("model_dir", help="a Hugging Face model directory (with its tokenizer)")
    g.add_argument("adapters", help="a folder with amole_config.json + adapters.safetensors")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=at_least(1), default=32, help="tokens to generate")
    g.add_argument("--max-length", type=at_least(1), default=None, help="stop at this many tokens, prompt included "
                   "(whichever comes first with --max-new-tokens)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the top tokens of this "
                   "probability mass (with --sample)")
    g.add_argument("--seed", type=int, default=0, help="random seed (with --sample)")
    g.add_argument("--quantize", choices=QUANTIZE, default=None, help="load the base with bitsandbytes")
    b = sub.add_parser("bench", formatter_class=_Formatter,
                       help="run a benchmark script (prints a table, appends a CSV row)")
    b.add_argument("name", choices=BENCHMARKS, help="the benchmark")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the script")


def parser() -> argparse.ArgumentParser:
    """The argument parser of `amole-compile` (the subcommand's name in `args.command`)."""
    ap = _Parser(prog="amole-compile", formatter_class=_Formatter,
                                 description="AdaMoLE adapters as a compiler pass: transform, train under "
                                 "torch.compile, export to ONNX.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks and library warnings instead of "
                    "one-line errors")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_demo, _inspect_and_stats, _export, _train, _generate_and_bench):
        add(sub)
    return ap
