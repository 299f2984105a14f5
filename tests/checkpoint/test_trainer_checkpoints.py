"""Trainer checkpoints hold what a resume needs and nothing the user already has (issue 23, item 2): the adapters
with the base referenced (config + sampled values, base_ref.py), the Trainer's optimizer, scheduler and RNG
state, as PEFT's do; a resume checks the base and refuses another one by name; a save the user asks for
(`save_pretrained`, `trainer.save_model()`) still writes the whole model."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import amole_compile as ac
from amole_compile.checkpoint.base_ref import check_same_base, reference
from amole_compile.checkpoint.pretrained import base_state_dict

from models import LMData, build

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


def base(seed: int = 0, **cfg) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build("llama", **SMALL, **cfg)


def adapted(seed: int = 0, model: torch.nn.Module | None = None) -> torch.nn.Module:
    model = base() if model is None else model
    torch.manual_seed(100 + seed)
    return ac.transform(model, ac.AdaMoLEConfig(dropout=0.0, num_experts=4, rank=2))


def args(out, **kw) -> tf.TrainingArguments:
    kw = dict(max_steps=2, save_steps=2, save_strategy="steps") | kw
    return tf.TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2,
                                use_cpu=True, report_to=[], disable_tqdm=True, seed=0, **kw)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def checkpoint(tmp_path) -> tuple[torch.nn.Module, object]:
    model = adapted()
    tf.Trainer(model=model, args=args(tmp_path / "run"), train_dataset=LMData(8)).train()
    return model, tmp_path / "run" / "checkpoint-2"


def test_a_checkpoint_holds_what_peft_holds_and_no_base(tmp_path):
    """The same files as a PEFT LoRA checkpoint (save_only_model off): adapters, optimizer, scheduler, RNG and
    trainer state; no tensor of the base, which is referenced (its config and samples) in the manifest."""
    from peft import LoraConfig, get_peft_model

    model, ckpt = checkpoint(tmp_path)
    peft = get_peft_model(base(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    tf.Trainer(model=peft, args=args(tmp_path / "peft"), train_dataset=LMData(8)).train()
    peft_files = {p.name for p in (tmp_path / "peft" / "checkpoint-2").iterdir()}
    ours = {p.name for p in ckpt.iterdir()}
    assert TRAINER_FILES <= peft_files and TRAINER_FILES <= ours
    assert ours - TRAINER_FILES == {"amole_config.json", "adapters.safetensors", "model.safetensors"}
    assert load_file(ckpt / "model.safetensors") == {}
    saved = set(load_file(ckpt / "adapters.safetensors"))
    assert saved and all(".adapters." in k for k in saved)
    ref = json.loads((ckpt / "amole_config.json").read_text())["base"]
    plain = [k for k, t in base_state_dict(model).items() if k.endswith((".weight", ".bias"))]
    assert ref["config"]["hidden_size"] == 32 and [e["key"] for e in ref["samples"]] == sorted(plain)
    adapter_bytes = sum(v.numel() * v.element_size() for k, v in model.state_dict().items() if ".adapters." in k)
    ours_bytes = sum((ckpt / n).stat().st_size for n in ("amole_config.json", "adapters.safetensors",
                                                        "model.safetensors"))
    assert ours_bytes < adapter_bytes + 32 * 1024, (ours_bytes, adapter_bytes)  # the adapters + JSON headers


def _merged_q() -> torch.nn.Module:
    """The base with an earlier low-rank update merged into every q projection (and nothing else changed)."""
    model = base()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("q_proj.weight"):
                p += 0.05 * torch.ones(p.shape[0], 1) @ torch.ones(1, p.shape[1])
    return model


@pytest.mark.parametrize("other", ["config", "weights", "merged_q"])
def test_resume_into_another_base_is_refused_by_name(tmp_path, other):
    """Another config (rms_norm_eps), other weights (another seed), or a LoRA merged into every q projection,
    under the same architecture: the resume raises naming the field or the tensor, and the model is left as it
    was."""
    _, ckpt = checkpoint(tmp_path)
    model = adapted(seed=1, model={"config": lambda: base(rms_norm_eps=1e-3), "weights": lambda: base(seed=1),
                                   "merged_q": _merged_q}[other]())
    before = state(model)
    trainer = tf.Trainer(model=model, args=args(tmp_path / "again", max_steps=4), train_dataset=LMData(8))
    want = {"config": "rms_norm_eps: 1e-06 there, 0.001 here", "weights": r"\S+\.weight holds other values",
            "merged_q": r"model\.layers\.0\.self_attn\.q_proj\.weight holds other values"}[other]
    with pytest.raises(ac.DifferentBaseError, match=f"resume refused: {ckpt} was trained on .*{want}"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    after = state(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_the_same_base_in_a_lower_precision_is_the_same_base():
    """Samples saved from fp32 match the base cast to bf16 / fp16 (compared in the base's dtype); a changed value
    or shape does not."""
    model = base()
    ref = reference(model, model.state_dict())
    for dtype in (torch.bfloat16, torch.float16):
        low = base().to(dtype)
        check_same_base(low, low.state_dict(), ref, "ckpt")
        sd = low.state_dict()
        key = ref["samples"][1]["key"]
        sd[key] = sd[key].clone()
        sd[key].view(-1)[0] += 1
        with pytest.raises(ac.DifferentBaseError, match=f"{key} holds other values"):
            check_same_base(low, sd, ref, "ckpt")
        sd[key] = sd[key][:1]
        with pytest.raises(ac.DifferentBaseError, match=f"{key} has shape"):
            check_same_base(low, sd, ref, "ckpt")


def test_best_model_reload_from_checkpoints_that_reference_the_base(tmp_path, monkeypatch):
    """load_best_model_at_end reads the best checkpoint's adapters; nothing is reported missing or unexpected."""
    results = []
    own = tf.Trainer._issue_warnings_after_load
    monkeypatch.setattr(tf.Trainer, "_issue_warnings_after_load",
                        lambda self, r: (results.append(r), own(self, r))[1])
    model = adapted()
    trainer = tf.Trainer(model=model, args=args(tmp_path / "run", max_steps=4, eval_strategy="steps",
                                                eval_steps=2, load_best_model_at_end=True,
                                                metric_for_best_model="eval_loss"),
                         train_dataset=LMData(8), eval_dataset=LMData(4))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best and results and all(not r.missing_keys and not r.unexpected_keys for r in results)
    saved = load_file(f"{best}/adapters.safetensors")
    fresh = adapted(seed=3)
    ac.load_adapters(fresh, best)
    want = {k: v for k, v in fresh.state_dict().items() if ".adapters." in k}
    got = model.state_dict()
    assert saved and all(torch.equal(got[k], v) for k, v in want.items())


def test_a_save_the_user_asks_for_writes_the_whole_model(tmp_path):
    """trainer.save_model() and save_pretrained outside a checkpoint: the base under its own names, which
    from_pretrained loads as the base model."""
    model = adapted()
    trainer = tf.Trainer(model=model, args=args(tmp_path / "run", save_strategy="no"), train_dataset=LMData(8))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    for k, v in base().state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert "base" not in json.loads((tmp_path / "final" / "amole_config.json").read_text())


def test_a_checkpoint_with_base_weights_but_no_adapters_is_refused(tmp_path):
    """A checkpoint folder whose model.safetensors holds base weights and no adapters of ours: the resume
    raises naming it (never reads another folder's adapters)."""
    model, ckpt = checkpoint(tmp_path)
    save_file(base_state_dict(model), str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    for name in ("amole_config.json", "adapters.safetensors"):
        (ckpt / name).unlink()
    trainer = tf.Trainer(model=adapted(seed=1), args=args(tmp_path / "again", max_steps=4),
                         train_dataset=LMData(8))
    with pytest.raises(ValueError, match=f"the checkpoint {ckpt} being loaded holds the base weights but no "
                                         "AdaMoLE adapters"):
        trainer.train(resume_from_checkpoint=str(ckpt))


def test_trl_checkpoints_reference_the_base(tmp_path):
    """TRL's SFTTrainer overrides _save_checkpoint: its checkpoints hold the adapters only, too."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from models import tokenizer

    text = [" ".join(f"w{i + j}" for j in range(8)) for i in range(8)]
    cfg = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, save_steps=1,
                    save_strategy="steps", use_cpu=True, report_to=[], disable_tqdm=True, bf16=False)
    SFTTrainer(model=adapted(), args=cfg, train_dataset=Dataset.from_dict({"text": text}),
               processing_class=tokenizer()).train()
    ckpt = tmp_path / "checkpoint-1"
    assert load_file(ckpt / "model.safetensors") == {}
    assert json.loads((ckpt / "amole_config.json").read_text())["base"]["samples"]


def test_resume_with_another_adapter_active_is_refused_by_name(tmp_path):
    """A checkpoint of adapter 'default' resumed into the model with 'other' active: refused, naming both and the
    fix (before, 'other' went on training with 'default''s optimizer state, silently); with 'default' active the
    resume goes on as the uninterrupted run does."""
    def two(active):
        model = adapted()
        ac.transform(model, ac.AdaMoLEConfig(dropout=0.0, num_experts=4, rank=2), adapter_name="other")
        return ac.set_active_adapter(model, active)

    straight = two("default")
    tf.Trainer(model=straight, args=args(tmp_path / "a", max_steps=4), train_dataset=LMData(16)).train()
    resumed = two("other")
    trainer = tf.Trainer(model=resumed, args=args(tmp_path / "b", max_steps=4), train_dataset=LMData(16))
    with pytest.raises(ValueError, match=r"trained adapter 'default', but the model being loaded runs 'other'.*"
                                         r"set_active_adapter\(model, 'default'\)"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    ac.set_active_adapter(resumed, "default")
    trainer = tf.Trainer(model=resumed, args=args(tmp_path / "c", max_steps=4), train_dataset=LMData(16))
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    want, got = state(straight), state(resumed)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
