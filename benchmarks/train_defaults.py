"""Does `amole-compile train` with its defaults lower the loss? The demo's synthetic routing task (each sequence's
first token picks the rule for the rest) as a JSONL text file, a small Llama built from config, trained by the
command line twice: with its defaults, and with the earlier ones (lr 1e-4, one epoch, linear decay, no warmup).

    python benchmarks/train_defaults.py [--records 400] [--hidden 64] [--layers 2]

Prints the first and last logged training loss and the eval loss of each run, appends a CSV row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from amole_compile.cli import main as cli
from amole_compile.cli.demo import VOCAB, synthetic_batch

import _common as bc

OLD_DEFAULTS = ["--lr", "1e-4", "--epochs", "1", "--scheduler", "linear", "--warmup-ratio", "0"]


def model_dir(root: Path, hidden: int, layers: int) -> Path:
    """A small Llama and a word-level tokenizer (t0 .. t{VOCAB-1}) saved to a folder."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"t{i}": 3 + i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    cfg = tf.LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 16, num_key_value_heads=hidden // 16,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    out = root / "model"
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def data(root: Path, records: int) -> Path:
    ids = synthetic_batch(records, 24, VOCAB, torch.Generator().manual_seed(0))
    path = root / "demo.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(f"t{t}" for t in row.tolist())}) for row in ids))
    return path


def run(model: Path, records: Path, out: Path, extra: list[str]) -> dict:
    argv = ["train", str(model), str(records), "--out", str(out), "--no-progress", "--logging-steps", "5",
            "--save-steps", "100000", *extra]
    if cli(argv) != 0:
        raise RuntimeError(f"amole-compile {' '.join(argv)} failed")
    history = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    return {"first loss": losses[0], "last loss": losses[-1], "eval loss": evals[-1] if evals else float("nan"),
            "steps": history[-1]["step"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, records = model_dir(root, args.hidden, args.layers), data(root, args.records)
        results = {"defaults": run(model, records, root / "new", []),
                   "earlier defaults": run(model, records, root / "old", OLD_DEFAULTS)}
    rows = [[k, v["steps"], f"{v['first loss']:.3f}", f"{v['last loss']:.3f}", f"{v['eval loss']:.3f}"]
            for k, v in results.items()]
    print(f"amole-compile train on the demo task: {args.records} records, Llama h{args.hidden} x{args.layers}")
    print(bc.table(rows, ["run", "steps", "first loss", "last loss", "eval loss"]))
    for k, v in results.items():
        bc.append_row("train_defaults", {"run": k, "records": args.records, "hidden": args.hidden,
                                         "layers": args.layers, **v})


if __name__ == "__main__":
    main()
