"""Hugging Face workflows on a transformed model: generate(), gradient checkpointing, bf16 / fp16 base models,
save_pretrained / from_pretrained of the base beside save_adapters / load_adapters, and the Trainer with the aux
loss (`amole_compile.integrations`)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

import amole_compile as ac

from models import LMData, build, ids

AUX = 1e-3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded machine OpenMP's spinning threads make
    each op ~40x slower; restore the setting for the tests after these."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def nonzero_b(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Adapters that matter: every lora_B drawn from N(0, std) (a fresh site adds exactly 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    return model


def pair(dtype: torch.dtype | None = None, **cfg) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(untouched copy of a tiny llama base, the same base transformed with nonzero lora_B); no dropout anywhere."""
    base = build("llama")
    if dtype is not None:
        base.to(dtype)
    model = ac.transform(copy.deepcopy(base), ac.AdaMoLEConfig(dropout=0.0, **cfg))
    return base, nonzero_b(model)


def adapter_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".adapters." in n}


def greedy_loop(model, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by hand: the whole sequence's forward each step, no KV cache."""
    for _ in range(steps):
        nxt = model(input_ids=x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        x = torch.cat([x, nxt], dim=1)
    return x


def test_generate_equals_manual_greedy_loop():
    """generate() (KV cache, HF's loop) gives the tokens of a plain greedy loop over full forwards."""
    base, model = pair()
    model.eval()
    x = ids(2, 5)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        want = greedy_loop(model, x, 8)
        assert not torch.equal(model(input_ids=want).logits, base(input_ids=want).logits)  # adapters matter
    assert out.shape == (2, 13)
    assert torch.equal(out, want)


def _grads(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    ac.compute_loss(model, {"input_ids": x, "labels": x}, aux_coef=AUX).backward()
    return {n: p.grad.clone() for n, p in adapter_params(model).items()}


def test_gradient_checkpointing_same_gradients_and_stats():
    """Non-reentrant checkpointing: every adapter gradient as without it, expert stats counted once."""
    _, plain = pair()
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert ckpt.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    x = ids(2, 12)
    for m in (plain.train(), ckpt.train()):
        ac.reset_expert_stats(m, passes="train")  # the training forwards
    want, got = _grads(plain, x), _grads(ckpt, x)
    assert want.keys() == got.keys() and len(want) == 2 * 4 * 5  # 2 layers x q,k,v,o x (A, B, gate, thr w, b)
    for name in want:
        assert want[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    s_plain, s_ckpt = ac.expert_stats(plain), ac.expert_stats(ckpt)
    assert [s.tokens for s in s_ckpt.sites] == [s.tokens for s in s_plain.sites] == [24] * 8
    assert s_ckpt == s_plain


@pytest.mark.parametrize("adapter_dtype", [None, "float32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_base(dtype, adapter_dtype):
    """bf16 / fp16 base: adapters in the requested dtype, outputs in the base dtype, forward + backward run."""
    base, model = pair(dtype, adapter_dtype=adapter_dtype)
    want = getattr(torch, adapter_dtype) if adapter_dtype else dtype
    params = adapter_params(model)
    assert params and all(p.dtype == want for p in params.values())
    assert all(p.dtype == dtype for n, p in model.named_parameters() if n not in params)
    x = ids(2, 10)
    model.train()
    out = model(input_ids=x, labels=x)
    assert out.logits.dtype == dtype
    loss = out.loss + AUX * ac.aux_loss(model)
    assert torch.isfinite(loss) and ac.aux_loss(model) > 0
    loss.backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.dtype == want and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for n, p in params.items() if "lora_A" in n)
    model.eval()
    with torch.no_grad():
        assert not torch.equal(model(input_ids=x).logits, base(input_ids=x).logits)  # the adapter path counts
        nonzero_b(model, std=0.0)
        torch.testing.assert_close(model(input_ids=x).logits, base(input_ids=x).logits, rtol=0, atol=0)


def test_save_pretrained_base_and_adapters_round_trip(tmp_path):
    """save_pretrained of a transformed model: from_pretrained of the directory is the plain base model (no
    missing / unexpected keys, its own weights) and load_adapters of the same directory gives identical logits.
    The explicit form (state_dict=base_state_dict(model)) writes the same thing."""
    base, model = pair()
    model.eval()
    sd = ac.base_state_dict(model)
    assert sd.keys() == base.state_dict().keys()
    assert ac.base_state_dict(torch.compile(model)).keys() == sd.keys()  # unwrapped (no `_orig_mod.` prefix)
    for d, kw in [(tmp_path / "plain", {}), (tmp_path / "explicit", {"state_dict": sd})]:
        model.save_pretrained(d, **kw)
        assert {"amole_config.json", "adapters.safetensors", "config.json", "model.safetensors"} <= set(
            p.name for p in d.iterdir())
        assert not (d / "adapter_config.json").exists()  # PEFT's name: from_pretrained would take d for a PEFT adapter
        loaded, info = tf.AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
        assert not any(info.values()), info  # no missing / unexpected / mismatched keys
        assert not any(".base_layer" in k or ".adapters." in k for k in loaded.state_dict())
        for key, value in base.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        x = ids(2, 9)
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(input_ids=x).logits, base(input_ids=x).logits, rtol=0, atol=0)
            ac.load_adapters(loaded, d)
            torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)



def _eval_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def test_plain_trainer_trains_with_the_aux_loss_in_the_model_loss(tmp_path):
    """A plain transformers.Trainer: the model's loss is task + 1e-3 * aux; a few steps lower the loss, move the
    adapters, keep the base. AdaMoLETrainer (retired) is a Trainer whose aux_coef sets the model's coefficient."""
    _, model = pair()
    data = LMData(seq=12)
    batch = {"input_ids": data.x[:4], "labels": data.x[:4]}
    args = tf.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6,
                                learning_rate=1e-2, weight_decay=0.0, use_cpu=True, report_to=[], save_strategy="no",
                                logging_steps=1, disable_tqdm=True, seed=0)
    model.train()
    out = model(**batch)
    aux = ac.aux_loss(model)
    assert aux > 0 and torch.equal(out.aux_loss, aux)
    model.eval()
    with torch.no_grad():
        task = model(**batch).loss  # eval mode: no aux recorded, the task loss alone
    model.train()
    torch.testing.assert_close(out.loss, task + AUX * aux, rtol=0, atol=1e-6)
    helper, outputs = ac.compute_loss(model, batch, return_outputs=True)
    torch.testing.assert_close(helper, out.loss, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="aux_loss_coef"):
        ac.compute_loss(model, batch, aux_coef=0.5)
    retired = ac.AdaMoLETrainer(model=model, args=args, train_dataset=data, aux_coef=2e-3)
    assert retired.aux_coef == 2e-3
    torch.testing.assert_close(model(**batch).loss, task + 2e-3 * ac.aux_loss(model), rtol=0, atol=1e-6)
    trainer = ac.AdaMoLETrainer(model=model, args=args, train_dataset=data, aux_coef=AUX)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss0 = _eval_loss(model, batch)
    trainer = tf.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert trainer.state.global_step == 6
    assert _eval_loss(model, batch) < loss0 - 0.05
    for n, p in model.named_parameters():
        if ".adapters." in n:
            assert not torch.equal(p, before[n]), f"{n} did not move"
        else:
            assert not p.requires_grad and torch.equal(p, before[n]), f"base parameter {n} changed"


def test_aux_loss_reaches_the_router_through_the_model_loss():
    """With lora_B = 0 the task loss does not depend on the router, so any router gradient is the aux loss's:
    the model's loss gives one with aux_loss_coef > 0 and none with 0 (where a custom loop adds it itself)."""
    x = ids(2, 8)
    batch = {"input_ids": x, "labels": x}
    for coef, routed in [(AUX, True), (0.0, False)]:
        model = ac.transform(build("llama"), ac.AdaMoLEConfig(dropout=0.0, aux_loss_coef=coef)).train()
        gates = [p for n, p in model.named_parameters() if n.endswith(".gate")]
        model(**batch).loss.backward()
        assert all((g.grad is not None and g.grad.abs().sum() > 0) == routed for g in gates)
        if not routed:  # the custom-loop way: no double counting, the same gradient as the model's own
            model.zero_grad(set_to_none=True)
            (model(**batch).loss + AUX * ac.aux_loss(model)).backward()
            assert all(g.grad.abs().sum() > 0 for g in gates)
