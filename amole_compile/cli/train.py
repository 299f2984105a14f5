"""`amole-compile train MODEL_DIR DATA` and `amole-compile generate MODEL_DIR ADAPTERS --prompt ...`.

train: a JSONL / JSON / CSV / Parquet file (or a directory saved by `datasets.save_to_disk`) with a `text` field,
or `prompt` and `response` fields (the loss is then on the response tokens only). It is tokenised with the model
directory's tokenizer, split into train / eval, and trained with the HF `Trainer` (progress bar, eval loss and
token accuracy, checkpoints, `--resume`); the model's own loss holds the aux loss. Writes the adapters
(`amole_config.json` + `adapters.safetensors`), the expert statistics (`expert_stats.json`, and
`expert_stats.png` when matplotlib is installed) into `--out`.

The run ends with one evaluation: the Trainer's own at the last step when the eval interval falls there, else
one `evaluate`. The expert statistics are of that one pass over the eval set, real tokens only, and say so (with
no eval set: one pass over up to STATS_RECORDS training records, in eval mode).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
QUANTIZE = ("4bit", "8bit")
STATS_RECORDS = 256  # records of the training set the statistics are taken over when there is no eval set


class DataError(ValueError):
    """The data file cannot be used (format, fields)."""


def load_records(path: str | Path, text_field: str = "text", prompt_field: str = "prompt",
                 response_field: str = "response"):
    """-> (datasets.Dataset, mode 'text' or 'chat'); a one-line error naming the fields found otherwise."""
    from ..integrations.quantized import require

    require("datasets", "reading training data")
    import datasets

    path = Path(path)
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    elif not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    elif path.suffix.lower() not in FORMATS:
        raise DataError(f"{path}: unknown data format {path.suffix!r}; use one of {sorted(FORMATS)} or a directory "
                        "saved by datasets.save_to_disk")
    elif path.stat().st_size == 0:
        raise DataError(f"{path} is empty: no records to train on")
    else:
        try:
            ds = datasets.load_dataset(FORMATS[path.suffix.lower()], data_files=str(path), split="train")
        except Exception as exc:  # pyarrow / json errors: one line
            raise DataError(f"{path}: cannot read it as {FORMATS[path.suffix.lower()]}: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if len(ds) == 0:
        raise DataError(f"{path} holds no records to train on")
    cols = list(ds.column_names)
    if text_field in cols:
        return ds, "text"
    if prompt_field in cols and response_field in cols:
        return ds, "chat"
    raise DataError(f"{path}: needs a {text_field!r} field or {prompt_field!r} and {response_field!r} fields; "
                    f"found {', '.join(map(repr, cols)) or 'none'}")


def drop_records_without_text(ds, mode: str, text_field: str = "text", prompt_field: str = "prompt",
                              response_field: str = "response"):
    """-> (the records whose text fields all hold a value, the indices of those left out). A JSON `null` or a
    missing field (both None here) is no text: `str(None)` would train on the word "None"."""
    fields = (text_field,) if mode == "text" else (prompt_field, response_field)
    missing = sorted({i for f in fields for i, v in enumerate(ds[f]) if v is None})
    if not missing:
        return ds, []
    keep = sorted(set(range(len(ds))) - set(missing))
    return ds.select(keep), missing


def tokenize(ds, mode: str, tokenizer, max_length: int, text_field: str = "text", prompt_field: str = "prompt",
             response_field: str = "response"):
    """input_ids / labels per record; with a prompt, the prompt tokens are labelled -100 (no loss)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def one(rec):
        if mode == "text":
            ids = tokenizer(str(rec[text_field]), add_special_tokens=True)["input_ids"] + eos
            labels = list(ids)
        else:
            p = tokenizer(str(rec[prompt_field]), add_special_tokens=True)["input_ids"]
            r = tokenizer(str(rec[response_field]), add_special_tokens=False)["input_ids"] + eos
            ids, labels = p + r, [-100] * len(p) + r
        return {"input_ids": ids[:max_length], "labels": labels[:max_length]}

    out = ds.map(one, remove_columns=ds.column_names)
    return out.filter(lambda r: any(v != -100 for v in r["labels"][1:]))


class _Collator:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows):
        import torch

        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.tensor(r["input_ids"])
            labels[i, :k] = torch.tensor(r["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _token_accuracy(eval_pred) -> dict:

    preds, labels = eval_pred.predictions, eval_pred.label_ids
    preds, labels = preds[:, :-1], labels[:, 1:]  # logits at t predict token t + 1
    valid = labels != -100
    return {"token_accuracy": float((preds == labels)[valid].mean()) if valid.any() else 0.0}


def _argmax(logits, labels):
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(-1)


def load_model(model_dir: str | Path, quantize: str | None = None):
    """The causal LM in model_dir, optionally quantized with bitsandbytes on load."""
    import json

    import transformers as tf

    from ..integrations.quantized import require

    saved = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config") or {}
    method = saved.get("quant_method")
    if method in ("bitsandbytes", "torchao"):
        require(method, f"{model_dir} (a base quantized with {method})")
    kw = {}
    if quantize is not None:
        if quantize not in QUANTIZE:
            raise ValueError(f"--quantize must be one of {QUANTIZE}, got {quantize!r}")
        require("bitsandbytes", f"--quantize {quantize}")
        import torch

        kw["quantization_config"] = (tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.float32)
                                     if quantize == "4bit" else tf.BitsAndBytesConfig(load_in_8bit=True))
        kw["device_map"] = "cpu" if not torch.cuda.is_available() else "auto"
    return tf.AutoModelForCausalLM.from_pretrained(model_dir, **kw)


def load_tokenizer(model_dir: str | Path):
    """The model directory's tokenizer, with a pad token (eos, else unk) when it has none."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{model_dir} has no usable tokenizer: {str(exc).splitlines()[0]}") from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def run_train(args, config) -> dict:
    """Train adapters on the data; -> {'out': dir, 'train_loss': ..., 'eval_loss': ..., 'eval_token_accuracy': ...}."""
    import torch
    import transformers as tf

    from ..checkpoint.io import save_adapters
    from ..core import transform

    ds, mode = load_records(args.data, args.text_field, args.prompt_field, args.response_field)
    ds, missing = drop_records_without_text(ds, mode, args.text_field, args.prompt_field, args.response_field)
    if missing:
        print(f"amole-compile: skipped {len(missing)} record(s) without text (null or missing field; the first is "
              f"record {missing[0] + 1}, counting from 1)", file=sys.stderr)
    if len(ds) == 0:
        raise DataError(f"{args.data}: no record has text to train on")
    tok = load_tokenizer(args.model_dir)
    data = tokenize(ds, mode, tok, args.max_length, args.text_field, args.prompt_field, args.response_field)
    if len(data) == 0:
        raise DataError(f"{args.data}: no record has a token to train on")
    n_eval = 0 if args.eval_fraction <= 0 or len(data) < 2 else max(1, int(math.ceil(len(data) * args.eval_fraction)))
    split = data.train_test_split(test_size=n_eval, seed=args.seed) if n_eval else None
    train, evals = (split["train"], split["test"]) if split else (data, None)
    _say(f"data: {len(train)} train / {n_eval} eval records from {args.data}")

    _say(f"loading {args.model_dir}{f' ({args.quantize})' if args.quantize else ''} and finding its projections ...")
    model = load_model(args.model_dir, args.quantize)
    tf.set_seed(args.seed)  # --seed decides the adapters' initialisation too, not only what the Trainer draws
    transform(model, config)
    out = Path(args.out)
    targs = tf.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch, per_device_eval_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum, num_train_epochs=args.epochs,
        max_steps=args.steps if args.steps else -1, learning_rate=args.lr, lr_scheduler_type=args.scheduler,
        warmup_steps=args.warmup_steps if args.warmup_steps else args.warmup_ratio,  # a float < 1: a share
        weight_decay=0.0, logging_steps=args.logging_steps, save_strategy="steps", save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, eval_strategy="steps" if evals is not None else "no",
        eval_steps=args.eval_steps or args.save_steps, report_to=[], seed=args.seed, torch_compile=args.compile,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=args.no_progress, remove_unused_columns=False)
    trainer = tf.Trainer(model=model, args=targs, train_dataset=train, eval_dataset=evals,
                         data_collator=_Collator(tok.pad_token_id), processing_class=tok,
                         compute_metrics=_token_accuracy if evals is not None else None,
                         preprocess_logits_for_metrics=_argmax if evals is not None else None,
                         callbacks=[_first_step_timer(args.compile), _stats_of_last_eval()])
    if args.resume:
        _say(f"resuming from {_last_checkpoint(out)}")
    result = trainer.train(resume_from_checkpoint=True if args.resume else None)
    summary = {"out": str(out), "train_loss": result.training_loss, "steps": trainer.state.global_step,
               "skipped_records": len(missing)}
    metrics, window = _final_eval(trainer, evals, train)
    summary.update({k: v for k, v in metrics.items() if k in ("eval_loss", "eval_token_accuracy")})
    save_adapters(model, out)
    tok.save_pretrained(out)
    summary.update(_save_stats(model, out, window, Path(args.model_dir).name))
    return summary


def _final_eval(trainer, evals, train) -> tuple[dict, str]:
    """One evaluation at the end (the Trainer's, when it ran at the last step), with the expert statistics of
    that pass alone (`_StatsOfLastEval` reset them before it) -> (its metrics, the window the statistics cover)."""
    from ..stats import reset_expert_stats

    step = trainer.state.global_step
    if evals is None:
        sample = train.select(range(min(STATS_RECORDS, len(train))))
        reset_expert_stats(trainer.model)
        trainer.evaluate(eval_dataset=sample, metric_key_prefix="stats")
        return {}, f"one pass over {len(sample)} training records in eval mode after step {step} (no eval set)"
    last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
    if last is None or last.get("step") != step:
        reset_expert_stats(trainer.model)
        last = trainer.evaluate()
    return last, f"one pass over the eval set ({len(evals)} records) after step {step}"


def _save_stats(model, out: Path, window: str, title: str) -> dict:
    from ..stats import expert_stats

    stats = expert_stats(model).over(window)
    if not stats.sites or not any(s.tokens for s in stats.sites):
        return {}
    _say(f"expert statistics: {window}")
    saved = {"stats": str(stats.save(out / "expert_stats.json"))}
    try:
        from ..stats import plot_expert_stats

        saved["plot"] = str(plot_expert_stats(stats, out / "expert_stats.png",
                                              title=f"{title}: AdaMoLE active experts per token"))
    except ImportError:
        saved["plot"] = "skipped (pip install matplotlib)"
    return saved


def _stats_of_last_eval():
    """A Trainer callback: before each evaluation the Trainer runs (its flag is set at the step's end), the
    expert statistics are zeroed, so that they hold the last evaluation's pass alone."""
    from transformers import TrainerCallback

    from ..stats import reset_expert_stats

    class StatsOfLastEval(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if control.should_evaluate and model is not None:
                reset_expert_stats(model)

    return StatsOfLastEval()


def _say(line: str) -> None:
    print(line, flush=True)


def _last_checkpoint(out: Path) -> str:
    """The checkpoint folder `--resume` continues from; DataError when there is none."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if last is None:
        raise DataError(f"--resume: no checkpoint-N folder in {out} to resume from")
    return last


def _first_step_timer(compiled: bool):
    """A Trainer callback that says, before the first step, that it can take long (torch.compile), and then how
    long it took."""
    import time

    from transformers import TrainerCallback

    class FirstStep(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.first = time.perf_counter(), state.global_step + 1
            if compiled:
                _say("compiling the training step with torch.compile (the first step takes a minute or more on "
                     "CPU) ...")

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.first:
                _say(f"first step{' (compiled)' if compiled else ''}: {time.perf_counter() - self.start:.1f} s")

    return FirstStep()


def run_generate(model_dir, adapters, prompt: str, max_new_tokens: int = 32, quantize: str | None = None, *,
                 max_length: int | None = None, sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0) -> str:
    """Generation from `prompt` with the model directory's base and the adapters of `adapters`: greedy, or
    sampled (`sample`, with `temperature` and `top_p`, seeded)."""
    import torch

    from ..checkpoint.io import load_adapters

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, quantize)
    load_adapters(model, adapters)
    model.eval()
    enc = tok(prompt, return_tensors="pt")
    if enc["input_ids"].shape[1] == 0:
        raise ValueError(f"--prompt {prompt!r} gives no token to start from: give some text")
    if sample and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"--temperature must be > 0 and --top-p in (0, 1], got {temperature} and {top_p}")
    n = enc["input_ids"].shape[1]
    if max_length is not None:
        if max_length <= n:
            raise ValueError(f"--max-length {max_length} leaves no room after the prompt's {n} tokens")
        max_new_tokens = min(max_new_tokens, max_length - n)
    torch.manual_seed(seed)
    kw = dict(do_sample=True, temperature=temperature, top_p=top_p) if sample else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **kw)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
