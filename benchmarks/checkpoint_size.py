"""What a Trainer checkpoint holds (issue 23, item 2): bytes per `checkpoint-N` folder of AdaMoLE against PEFT LoRA
(the same total rank, `save_only_model` off), and against the whole model `save_pretrained` writes; and the time a
checkpoint's base reference takes to make and to check.

    python benchmarks/checkpoint_size.py [--hidden 512 --layers 4 --vocab 32000]

Prints a table (files by kind: the model's, the Trainer's) and appends a CSV row.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import amole_compile as ac
from amole_compile.checkpoint.base_ref import check_same_base, reference

import _common as bc

TRAINER = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


def base(args):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64)
    return AutoModelForCausalLM.from_config(cfg)


def one_checkpoint(model, out: Path) -> Path:
    """Train one step with the HF Trainer, saving a checkpoint; -> the checkpoint folder."""
    import transformers as tf

    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": r, "labels": r} for r in ids]
    args = tf.TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=1, save_steps=1,
                                save_strategy="steps", use_cpu=True, report_to=[], disable_tqdm=True)
    tf.Trainer(model=model, args=args, train_dataset=data).train()
    return out / "checkpoint-1"


def sizes(folder: Path) -> tuple[int, int]:
    """(bytes of the model's files, bytes of the Trainer's files) in a checkpoint folder."""
    model = trainer = 0
    for f in folder.iterdir():
        if f.is_file():
            if f.name in TRAINER:
                trainer += f.stat().st_size
            else:
                model += f.stat().st_size
    return model, trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    args = p.parse_args()
    from peft import LoraConfig, get_peft_model

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours = ac.transform(base(args), ac.AdaMoLEConfig(num_experts=8, rank=4))
        rows["AdaMoLE checkpoint"] = sizes(one_checkpoint(ours, tmp / "ours"))
        peft = get_peft_model(base(args), LoraConfig(r=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        rows["PEFT LoRA r=32 checkpoint"] = sizes(one_checkpoint(peft, tmp / "peft"))
        ours.save_pretrained(tmp / "full")
        rows["save_pretrained (whole model)"] = sizes(tmp / "full")
        base_sd = ac.base_state_dict(ours)
        t0 = time.perf_counter()
        ref = reference(ours, base_sd)
        t1 = time.perf_counter()
        check_same_base(ours, base_sd, ref, tmp)
        t2 = time.perf_counter()
    print(f"Llama h{args.hidden} x {args.layers} layers, vocab {args.vocab}; AdaMoLE E8 r4 on q, k, v, o")
    print(f"{'folder':<32} {'model files MB':>15} {'Trainer files MB':>17}")
    for name, (m, t) in rows.items():
        print(f"{name:<32} {m / 1e6:>15.2f} {t / 1e6:>17.2f}")
    print(f"base reference: made in {1e3 * (t1 - t0):.2f} ms, checked in {1e3 * (t2 - t1):.2f} ms")
    row = {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
           **{f"{k.split()[0].lower()}_{kind}_mb": round(v[i] / 1e6, 3) for k, v in rows.items()
              for i, kind in enumerate(("model", "trainer"))},
           "reference_ms": round(1e3 * (t1 - t0), 3), "check_ms": round(1e3 * (t2 - t1), 3)}
    print(f"row -> {bc.append_row('checkpoint_size', row)}")


if __name__ == "__main__":
    main()
