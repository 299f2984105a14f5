"""The fine-tuning ecosystem on a transformed model, with no subclass: HF `Trainer` and TRL `SFTTrainer` train
the router through the aux loss inside the model's loss (also with gradient accumulation and gradient
checkpointing), Trainer checkpoints save our adapters (the base referenced:
tests/checkpoint/test_trainer_checkpoints.py) and resume exactly, and a load that would drop the adapters raises."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import amole_compile as ac
from amole_compile.integrations.loss import _AuxOnLogProbs

from models import LMData, build, ids, tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)


def tiny(coef: float = 1e-3, seed: int = 0, **cfg) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ac.transform(build("llama", **SMALL), ac.AdaMoLEConfig(dropout=0.0, aux_loss_coef=coef, num_experts=4,
                                                                  rank=2, **cfg))



def _common(tmp_path, **kw) -> dict:
    return dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.0,
                use_cpu=True, report_to=[], disable_tqdm=True, seed=0, logging_steps=1, **kw)


def _gates(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".gate")}


def _hf(model, tmp_path, **kw):
    args = tf.TrainingArguments(**_common(tmp_path, max_steps=1, save_strategy="no", **kw))
    return tf.Trainer(model=model, args=args, train_dataset=LMData())


def _trl(model, tmp_path, **kw):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    g = torch.Generator().manual_seed(1)
    text = [" ".join(f"w{int(i)}" for i in torch.randint(0, 100, (10,), generator=g)) for _ in range(8)]
    args = SFTConfig(**_common(tmp_path, max_steps=1, save_strategy="no", bf16=False, **kw))
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": text}),
                      processing_class=tokenizer())


MODES = {"plain": {}, "accumulation": {"gradient_accumulation_steps": 2}, "checkpointing":
         {"gradient_checkpointing": True}}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("trainer", ["hf", "trl"])
def test_trainers_put_the_aux_gradient_on_the_router(trainer, mode, tmp_path):
    """lora_B = 0 at init, so the task loss gives the gate no gradient: after one step the gates moved iff
    aux_loss_coef > 0, under HF Trainer and TRL SFTTrainer, with accumulation and with checkpointing."""
    make = {"hf": _hf, "trl": _trl}[trainer]
    moved = {}
    for coef in (0.0, 1e-3):
        model = tiny(coef)
        before = _gates(model)
        make(model, tmp_path / str(coef), **MODES[mode]).train()
        after = _gates(model)
        moved[coef] = [not torch.equal(after[n], before[n]) for n in before]
    assert len(moved[0.0]) == 8 and not any(moved[0.0])
    assert all(moved[1e-3])


def test_aux_on_log_probs_weight_is_the_token_share_times_the_scale():
    """TRL's loss is -sum(log_probs over labelled tokens) / N (times the trainer's scale s): the aux term gets
    coef * s * n_local / N, what the Trainer path adds to the loss."""
    lp = torch.randn(2, 5, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    aux = torch.tensor(2.0, requires_grad=True)
    out = _AuxOnLogProbs.apply(lp, mask, aux, 0.1)
    assert torch.equal(out, lp)
    n_global, scale = 20, 0.5
    (-(out * mask).sum() / n_global * scale).backward()
    torch.testing.assert_close(aux.grad, torch.tensor(0.1 * scale * mask.sum().item() / n_global))
    torch.testing.assert_close(lp.grad, -mask.float() / n_global * scale)


def test_hf_trainer_aux_weight_under_accumulation_is_the_token_share(tmp_path):
    """With num_items_in_batch (the Trainer's token-normalised accumulation) each micro-batch adds
    coef * aux * (its label tokens / the accumulated batch's), so the step adds coef * aux once."""
    model = tiny(0.5).train()
    x = ids(2, 10)
    plain = model(input_ids=x, labels=x)
    aux = plain.aux_loss.detach()
    task = plain.loss.detach() - 0.5 * aux
    n = 2 * 9  # labelled tokens of this micro-batch (causal shift)
    out = model(input_ids=x, labels=x, num_items_in_batch=torch.tensor(4 * n))
    torch.testing.assert_close(out.loss, task / 4 + 0.5 * aux / 4, rtol=1e-5, atol=1e-6)


def test_a_no_grad_forward_keeps_the_recorded_aux():
    model = tiny().train()
    x = ids(2, 8)
    out = model(input_ids=x, labels=x)
    kept = ac.aux_loss(model)
    assert kept.requires_grad and torch.equal(kept, out.aux_loss)
    with torch.no_grad():
        other = model(input_ids=ids(1, 5, seed=3), labels=ids(1, 5, seed=3))
    assert other.aux_loss is not None and not torch.equal(other.aux_loss, kept)
    now = ac.aux_loss(model)  # the extra no_grad forward (TRL's metrics pass) did not replace it
    assert now.requires_grad and torch.equal(now, kept)
    model(input_ids=ids(1, 5, seed=3), labels=ids(1, 5, seed=3))  # the next forward with gradients replaces it
    torch.testing.assert_close(ac.aux_loss(model), other.aux_loss)


def _adapters(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".adapters." in k}


def adapted(seed: int = 0, base_seed: int = 0, **cfg) -> torch.nn.Module:
    """The same base (base_seed) with adapters initialised from `seed`."""
    torch.manual_seed(base_seed)
    base = build("llama", **SMALL)
    torch.manual_seed(seed)
    return ac.transform(base, ac.AdaMoLEConfig(dropout=0.0, aux_loss_coef=1e-3, num_experts=4, rank=2, **cfg))


def test_checkpoints_hold_the_adapters_and_resume_exactly(tmp_path):
    """Trainer checkpoints hold the adapters, not the base (an empty model.safetensors marker, no config.json,
    so from_pretrained of one fails instead of giving a random model); load_adapters onto the base restores
    them; resume_from_checkpoint gives the adapter weights and optimizer state of the uninterrupted run (the
    resumed model starts from other adapters, so they were loaded)."""
    def make(out, seed):
        model = adapted(seed=seed)
        args = tf.TrainingArguments(**_common(out, max_steps=4, save_steps=2, save_strategy="steps"))
        return model, tf.Trainer(model=model, args=args, train_dataset=LMData(16))

    full, t_full = make(tmp_path / "full", seed=0)
    t_full.train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert {"amole_config.json", "adapters.safetensors", "model.safetensors", "optimizer.pt"} <= {
        p.name for p in ckpt.iterdir()}
    assert not (ckpt / "adapter_config.json").exists() and not (ckpt / "config.json").exists()
    assert load_file(ckpt / "model.safetensors") == {}
    assert json.loads((ckpt / "amole_config.json").read_text())["base"]["samples"]
    with pytest.raises((OSError, ValueError), match="config.json"):
        tf.AutoModelForCausalLM.from_pretrained(ckpt)
    torch.manual_seed(0)
    loaded = build("llama", **SMALL)
    ac.load_adapters(loaded, ckpt)
    assert json.loads((ckpt / "amole_config.json").read_text())["format"] == "amole_compile"

    resumed, t_res = make(tmp_path / "resumed", seed=1)
    assert any(not torch.equal(v, _adapters(full)[k]) for k, v in _adapters(resumed).items())
    t_res.train(resume_from_checkpoint=str(ckpt))
    assert t_res.state.global_step == 4
    want, got = _adapters(full), _adapters(resumed)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    o1, o2 = t_full.optimizer.state_dict()["state"], t_res.optimizer.state_dict()["state"]
    assert o1.keys() == o2.keys() and o1
    for i in o1:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(o2[i][k], o1[i][k], rtol=0, atol=0)


def test_resume_reads_only_the_checkpoint_it_is_given(tmp_path):
    """A checkpoint folder without our files (its save interrupted after the marker), inside an output folder
    that holds adapters (a final save_pretrained): resuming from it raises, naming the checkpoint, instead of
    reading the output folder's adapters (its parent's) or going on with the adapters the model has."""
    model = tiny()
    args = tf.TrainingArguments(**_common(tmp_path, max_steps=2, save_steps=2, save_strategy="steps"))
    tf.Trainer(model=model, args=args, train_dataset=LMData(8)).train()
    model.save_pretrained(tmp_path)  # the output folder now holds adapters too
    ckpt = tmp_path / "checkpoint-2"
    for name in ("amole_config.json", "adapters.safetensors"):
        (ckpt / name).unlink()
    resumed = tiny(seed=1)
    before = _adapters(resumed)
    trainer = tf.Trainer(model=resumed, args=tf.TrainingArguments(**_common(tmp_path / "r", max_steps=4)),
                         train_dataset=LMData(8))
    with pytest.raises(ValueError, match=f"the checkpoint {ckpt} being loaded holds no AdaMoLE adapters .*its "
                                         "save was interrupted"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert all(torch.equal(v, before[k]) for k, v in _adapters(resumed).items())


def test_a_load_that_would_drop_the_adapters_raises(tmp_path):
    """A base-only state dict (what save_pretrained writes) loaded into a transformed model outside a Trainer
    checkpoint raises instead of leaving the adapters as they were; the model's own state dict loads."""
    model = tiny()
    model.save_pretrained(tmp_path)
    base_only = load_file(tmp_path / "model.safetensors")
    before = _adapters(model)
    with pytest.raises(ValueError, match="none of its AdaMoLE adapters.*load_adapters"):
        model.load_state_dict(base_only, strict=False)
    assert all(torch.equal(v, before[k]) for k, v in _adapters(model).items())
    result = model.load_state_dict(model.state_dict())
    assert not result.missing_keys and not result.unexpected_keys


def test_legacy_adapter_config_is_read_and_replaced(tmp_path):
    """Directories saved before the rename (`adapter_config.json` with format amole_compile) still load; saving
    into such a directory removes the old file, which from_pretrained would take for a PEFT adapter."""
    model = tiny()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ac.save_adapters(model, tmp_path)
    (tmp_path / "amole_config.json").rename(tmp_path / "adapter_config.json")
    fresh = build("llama", **SMALL)
    ac.load_adapters(fresh, tmp_path)
    assert all(torch.equal(v, _adapters(model)[k]) for k, v in _adapters(fresh).items())
    ac.save_adapters(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters.safetensors", "amole_config.json"]


def test_untransform_removes_the_hooks():
    model = tiny()
    x = ids(1, 6)
    ac.untransform(model)
    model.train()
    out = model(input_ids=x, labels=x)
    assert "aux_loss" not in out and "save_pretrained" not in model.__dict__
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_compiled_trainer_with_checkpointing_has_no_graph_breaks(tmp_path):
    """Trainer(torch_compile=True, gradient_checkpointing=True): no graph break. The op is registered at
    transform time (not inside the compiled forward), and HF's enable_input_require_grads, whose
    `requires_grad_` hook breaks the graph, is skipped under non-reentrant checkpointing, which does not need it;
    the adapters and the router still train."""
    from torch._dynamo.utils import counters

    model = tiny()
    model.loss_type = "ForCausalLM"
    before = _gates(model)
    torch._dynamo.reset()
    counters.clear()
    args = tf.TrainingArguments(**_common(tmp_path, max_steps=2, save_strategy="no", torch_compile=True,
                                          torch_compile_backend="aot_eager", gradient_checkpointing=True))
    trainer = tf.Trainer(model=model, args=args, train_dataset=LMData())
    trainer.train()
    assert model.is_activation_checkpointing and not getattr(model, "_require_grads_hooks", None)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    assert all(not torch.equal(p, before[n]) for n, p in _gates(model).items())
    torch._dynamo.reset()


def test_reentrant_checkpointing_keeps_the_input_grad_hook():
    model = tiny()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert getattr(model, "_require_grads_hooks", None)


def test_trl_default_bf16_autocast_trains(tmp_path):
    """TRL's SFTConfig defaults to bf16=True (CPU autocast): the adapters compute in their own dtype inside it."""
    model = tiny()
    before = _gates(model)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    text = [" ".join(f"w{(i * 7 + j) % 100}" for j in range(10)) for i in range(8)]
    args = SFTConfig(**_common(tmp_path, max_steps=1, save_strategy="no"))
    assert args.bf16
    SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": text}),
               processing_class=tokenizer()).train()
    assert all(not torch.equal(p, before[n]) for n, p in _gates(model).items())
    assert {p.dtype for n, p in model.named_parameters() if ".adapters." in n} == {torch.float32}


def test_transformed_model_pickles_and_deepcopies(tmp_path):
    """The instance-level save_pretrained survives torch.save / torch.load and copy.deepcopy (bound to the copy)."""
    import copy

    model = tiny()
    clone = copy.deepcopy(model)
    assert clone.save_pretrained.model is clone
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert loaded.save_pretrained.model is loaded
    loaded.save_pretrained(tmp_path / "d")
    assert (tmp_path / "d" / "amole_config.json").is_file()


def test_return_dict_false_adds_the_aux_to_the_loss_in_first_place():
    """A tuple output (return_dict=False) with labels gets the same loss as the dict form (aux included), keeps
    its length, and without labels stays as the model returned it."""
    model = tiny(coef=0.5).train()
    x = ids(2, 8)
    torch.manual_seed(0)
    as_dict = model(input_ids=x, labels=x)
    torch.manual_seed(0)
    as_tuple = model(input_ids=x, labels=x, return_dict=False)
    assert as_dict.aux_loss > 0
    assert len(as_tuple) == len(as_dict.to_tuple()) - 1  # the dict form also carries aux_loss
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)
    gates = [p for n, p in model.named_parameters() if n.endswith(".gate")]
    as_tuple[0].backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)  # lora_B = 0: the aux's gradient
    no_labels = model(input_ids=x, return_dict=False)
    assert not any(t.dim() == 0 for t in no_labels if isinstance(t, torch.Tensor))


def test_return_dict_false_without_a_scalar_loss_first_warns():
    """Labels passed but the tuple does not start with a scalar loss: a warning, never a silent drop."""
    from amole_compile.integrations.loss import _post_forward_tuple

    model = tiny(coef=0.5).train()
    x = ids(2, 8)
    with pytest.warns(RuntimeWarning, match="aux loss was not added"):
        assert _post_forward_tuple(model, (), {"labels": x}, (torch.zeros(2, 8, 5),), torch.tensor(1.0)) is None


def test_trl_reference_model_after_a_training_step():
    """TRL's `create_reference_model` deep-copies the policy: after a training step (the sites hold the aux
    loss's graph) it gives a frozen, independent copy."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.utils import create_reference_model
    model = tiny().train()
    x = ids(2, 6)
    model(input_ids=x, labels=x).loss.backward()
    ref = create_reference_model(model)
    assert ref is not model and ac.is_transformed(ref)
    assert not any(p.requires_grad for p in ref.parameters())
    ref.eval(), model.eval()
    with torch.no_grad():
        before = ref(input_ids=x).logits
        torch.testing.assert_close(before, model(input_ids=x).logits, rtol=0, atol=0)
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.add_(0.1)
        torch.testing.assert_close(ref(input_ids=x).logits, before, rtol=0, atol=0)


def test_save_model_into_the_output_folder_keeps_its_checkpoints(tmp_path):
    """`trainer.save_model()` writes the model into the output folder that holds the run's checkpoints
    (`save_pretrained`, swapped in whole): the checkpoint folders come along as the same files, and a run
    resumes from one of them afterwards."""
    import os

    model = adapted(seed=0)
    args = tf.TrainingArguments(**_common(tmp_path, max_steps=2, save_steps=1, save_strategy="steps"))
    trainer = tf.Trainer(model=model, args=args, train_dataset=LMData(16))
    trainer.train()
    ckpt = tmp_path / "checkpoint-1"
    before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in ckpt.iterdir() if p.is_file()}
    trainer.save_model()
    assert {"checkpoint-1", "checkpoint-2", "config.json", "model.safetensors", "amole_config.json",
            "adapters.safetensors"} <= set(os.listdir(tmp_path))
    assert {p.name: (p.stat().st_ino, p.read_bytes()) for p in ckpt.iterdir() if p.is_file()} == before
    resumed = tf.Trainer(model=adapted(seed=1), args=args, train_dataset=LMData(16))
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 2
