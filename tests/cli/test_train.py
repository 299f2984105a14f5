"""`amole-compile train MODEL_DIR DATA` and `generate`: a model directory and a tokenizer built locally (no
downloads), JSONL with text, CSV with prompt/response, resume, bad data."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from amole_compile.cli import main

from models import build, tokenizer

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = build("llama", **SMALL, pad_token_id=0, bos_token_id=None, eos_token_id=1)
    model.save_pretrained(d)
    tokenizer().save_pretrained(d)
    return d


def _words(i: int, n: int = 8) -> str:
    return " ".join(f"w{(i * 7 + j) % 100}" for j in range(n))


def _train(model_dir, data, out, *extra):
    return main(["train", str(model_dir), str(data), "--out", str(out), "--steps", "4", "--batch", "4",
                 "--lr", "1e-2", "--experts", "2", "--rank", "2", "--save-steps", "2", "--logging-steps", "1",
                 "--no-progress", *extra])


def test_train_text_jsonl_then_generate(model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": _words(i)}) for i in range(20)))
    assert _train(model_dir, data, tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "eval_loss:" in out and "eval_token_accuracy:" in out and "train_loss:" in out
    o = tmp_path / "out"
    assert (o / "amole_config.json").is_file() and (o / "expert_stats.json").is_file()
    assert (o / "checkpoint-4").is_dir()
    b = [t for k, t in load_file(o / "adapters.safetensors").items() if k.endswith("lora_B")]
    assert b and all(t.abs().sum() > 0 for t in b)  # trained away from zero
    assert main(["generate", str(model_dir), str(o), "--prompt", "w1 w2 w3", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_train_prompt_response_csv_and_resume(model_dir, tmp_path, capsys):
    data = tmp_path / "d.csv"
    with data.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "response"])
        for i in range(12):
            w.writerow([_words(i, 5), _words(i + 50, 3)])
    out = tmp_path / "out"
    assert _train(model_dir, data, out, "--roles", "q,v", "--method", "mole") == 0
    cfg = json.loads((out / "amole_config.json").read_text())["adapters"]["default"]
    assert cfg["config"]["method"] == "mole" and {t["roles"][0] for t in cfg["targets"]} == {"q", "v"}
    assert main(["train", str(model_dir), str(data), "--out", str(out), "--steps", "6", "--batch", "4",
                 "--experts", "2", "--rank", "2", "--method", "mole", "--roles", "q,v", "--save-steps", "2",
                 "--resume", "--no-progress"]) == 0
    assert "steps: 6" in capsys.readouterr().out


def test_prompt_tokens_get_no_loss(model_dir):
    import datasets

    from amole_compile.cli.train import load_tokenizer, tokenize

    tok = load_tokenizer(model_dir)
    ds = datasets.Dataset.from_dict({"prompt": ["w1 w2 w3"], "response": ["w4 w5"]})
    row = tokenize(ds, "chat", tok, 64)[0]
    assert row["labels"][:3] == [-100] * 3 and row["labels"][3:] == row["input_ids"][3:]
    assert row["input_ids"][-1] == tok.eos_token_id


def test_data_without_the_fields_is_a_one_line_error(model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    assert main(["train", str(model_dir), str(data), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'question', 'answer'" in err and "'text'" in err
    assert not (tmp_path / "o").exists()  # nothing written


def test_records_without_text_are_skipped_and_counted(model_dir, tmp_path, capsys):
    """A `null` or missing text field is no text: it used to be trained on as the word "None"."""
    from amole_compile.cli.train import drop_records_without_text, load_records

    data = tmp_path / "d.jsonl"
    rows = [{"text": _words(i)} for i in range(12)]
    rows[3] = {"text": None}
    rows[7] = {"other": "no text field"}
    data.write_text("\n".join(json.dumps(r) for r in rows))
    ds, mode = load_records(data)
    kept, missing = drop_records_without_text(ds, mode)
    assert missing == [3, 7] and len(kept) == 10 and None not in kept["text"]
    assert _train(model_dir, data, tmp_path / "out") == 0
    captured = capsys.readouterr()
    assert "skipped 2 record(s) without text" in captured.err and "record 4, counting from 1" in captured.err
    assert "skipped_records: 2" in captured.out
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n".join(json.dumps({"text": None}) for _ in range(3)))
    assert _train(model_dir, empty, tmp_path / "out2") == 1
    assert "no record has text to train on" in capsys.readouterr().err


@pytest.fixture(scope="module")
def adapters_dir(model_dir, tmp_path_factory):
    import amole_compile as ac
    from amole_compile.cli.load import load_pretrained

    d = tmp_path_factory.mktemp("adapters")
    ac.save_adapters(ac.transform(load_pretrained(model_dir), ac.AdaMoLEConfig(num_experts=2, rank=2)), d)
    return d


def test_inputs_that_give_nothing_to_run_are_named(model_dir, adapters_dir, tmp_path, capsys):
    """Each used to fail inside a reshape or a StopIteration; now one line names the input."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert _train(model_dir, empty, tmp_path / "out") == 1
    assert f"{empty} is empty: no records to train on" in capsys.readouterr().err
    assert main(["generate", str(model_dir), str(adapters_dir), "--prompt", ""]) == 1
    assert "--prompt '' gives no token to start from" in capsys.readouterr().err
    for option in ("--seq", "--batch"):
        with pytest.raises(SystemExit) as exit_:
            main(["stats", str(model_dir), str(adapters_dir), option, "0"])
        assert exit_.value.code == 2
        assert f"argument {option}: must be an integer >= 1, got 0" in capsys.readouterr().err


def test_training_options_reach_the_trainer(model_dir, tmp_path):
    """Gradient accumulation, warmup, scheduler, an eval interval apart from checkpoints, a checkpoint limit."""
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": _words(i)}) for i in range(24)))
    out = tmp_path / "out"
    assert _train(model_dir, data, out, "--grad-accum", "2", "--warmup-steps", "1", "--scheduler", "cosine",
                  "--eval-steps", "1", "--save-total-limit", "1") == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # saved at 2 and 4, kept 1
    args = torch.load(out / "checkpoint-4" / "training_args.bin", weights_only=False)
    assert (args.gradient_accumulation_steps, args.warmup_steps, str(args.lr_scheduler_type)) == (
        2, 1, "SchedulerType.COSINE")
    history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "eval_loss" in h] == [1, 2, 3, 4]  # every step, not every save


def test_generate_samples_with_a_seed_and_stops_at_max_length(model_dir, adapters_dir, capsys):
    base = ["generate", str(model_dir), str(adapters_dir), "--prompt", "w1 w2 w3", "--max-new-tokens", "6"]
    runs = []
    for extra in (["--sample", "--temperature", "1.5", "--top-p", "0.9", "--seed", "3"],) * 2 + (
            ["--sample", "--temperature", "1.5", "--seed", "4"], ["--max-length", "5"]):
        assert main([*base, *extra]) == 0
        runs.append(capsys.readouterr().out.strip().split())
    assert runs[0] == runs[1] and len(runs[0]) <= 6  # the same seed, the same sample
    assert len(runs[3]) <= 2  # 5 tokens in all: the 3-token prompt leaves 2
    assert main([*base, "--max-length", "3"]) == 1
    assert "leaves no room after the prompt's 3 tokens" in capsys.readouterr().err


def test_statistics_are_one_eval_pass_over_real_tokens(model_dir, tmp_path, monkeypatch):
    """The run ends with one evaluation (the Trainer's at the last step; no second one), and expert_stats.json
    holds that pass alone, over the eval set's real tokens (padding not counted), saying so."""
    import transformers as tf

    from amole_compile.cli.train import load_records, load_tokenizer, tokenize

    calls = []
    own = tf.Trainer.evaluate
    monkeypatch.setattr(tf.Trainer, "evaluate", lambda self, *a, **k: (calls.append(1), own(self, *a, **k))[1])
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": _words(i, n=3 + i % 9)}) for i in range(40)))
    assert _train(model_dir, data, tmp_path / "out", "--eval-fraction", "0.25") == 0
    assert len(calls) == 2  # at steps 2 and 4 (the eval interval is the save interval); none after
    ds, mode = load_records(data)
    split = tokenize(ds, mode, load_tokenizer(model_dir), 512).train_test_split(test_size=10, seed=0)
    real = sum(len(r["input_ids"]) for r in split["test"])
    padded = sum(max(len(r["input_ids"]) for r in split["test"].select(range(i, min(i + 4, 10))))
                 * len(range(i, min(i + 4, 10))) for i in range(0, 10, 4))
    stats = json.loads((tmp_path / "out" / "expert_stats.json").read_text())
    assert real < padded and {s["tokens"] for s in stats["sites"]} == {real}
    assert stats["scope"]["window"] == "one pass over the eval set (10 records) after step 4"
    assert stats["scope"]["passes"] == "eval"


def test_a_resumed_run_has_the_statistics_of_an_uninterrupted_one(model_dir, tmp_path):
    """Stopped at step 2 and resumed to step 4, the run saves the statistics an uninterrupted 4-step run saves:
    they are of the last evaluation's pass, not a sum over however the run got there."""
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": _words(i, n=3 + i % 5)}) for i in range(24)))
    flat = ("--scheduler", "constant", "--warmup-steps", "0")  # the lr does not depend on --steps
    assert _train(model_dir, data, tmp_path / "whole", *flat) == 0
    part = ["train", str(model_dir), str(data), "--out", str(tmp_path / "part"), "--batch", "4", "--lr", "1e-2",
            "--experts", "2", "--rank", "2", "--save-steps", "2", "--logging-steps", "1", "--no-progress", *flat]
    assert main([*part, "--steps", "2"]) == 0
    assert main([*part, "--steps", "4", "--resume"]) == 0
    whole, part = (json.loads((tmp_path / d / "expert_stats.json").read_text()) for d in ("whole", "part"))
    assert whole["scope"]["window"] == part["scope"]["window"] == "one pass over the eval set (3 records) after step 4"
    for a, b in zip(whole["sites"], part["sites"], strict=True):
        assert a["tokens"] == b["tokens"] > 0
        assert a["active_histogram"] == pytest.approx(b["active_histogram"], abs=1e-6)


def test_output_files_and_folders_get_the_mode_the_umask_gives(model_dir, tmp_path):
    """--out, its checkpoints and every file we write there (adapters, statistics, plot, the checkpoint marker)
    get the mode the umask gives, not 0600 / 0700."""
    import os
    import stat

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": _words(i)}) for i in range(12)))
    before = os.umask(0o027)
    try:
        assert _train(model_dir, data, tmp_path / "out") == 0
    finally:
        os.umask(before)
    out = tmp_path / "out"
    for folder in (out, out / "checkpoint-4"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o750, folder
    ours = ["amole_config.json", "adapters.safetensors", "expert_stats.json", "expert_stats.png",
            "checkpoint-4/amole_config.json", "checkpoint-4/adapters.safetensors", "checkpoint-4/model.safetensors"]
    for name in ours:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o640, name
