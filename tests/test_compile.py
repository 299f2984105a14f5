"""torch.compile of forward + loss + aux_loss: one frame, zero graph breaks, the eager result, no extra recompiles
under dynamic shapes, bf16 autocast and HF gradient checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import amole_compile as ac

from models import ARCHS, CONFIGS, build, ids

pytestmark = pytest.mark.slow
_DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob",
             "dropout", "attention_dropout", "hidden_dropout", "activation_dropout", "layerdrop", "resid_dropout",
             "embd_dropout", "classifier_dropout")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def small(arch: str) -> torch.nn.Module:
    """One layer keeps inductor's compile time down; the loss type is set because HF logs a warning (a graph
    break, adapters or not) for model classes whose name does not tell it, such as GPT2LMHeadModel."""
    cfg = CONFIGS[arch]()
    off = {k: 0.0 for k in _DROPOUTS if isinstance(getattr(cfg, k, None), float)}  # same numbers eager/compiled
    model = build(arch, num_hidden_layers=1, **off)
    model.loss_type = "ForMaskedLM" if arch == "bert" else "ForCausalLM"
    return model


def adapted(arch: str, **kw) -> torch.nn.Module:
    model = small(arch)
    ac.transform(model, ac.AdaMoLEConfig(dropout=0.0, **kw))
    with torch.no_grad():  # adapters that matter: nonzero B
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.train()


def step_fn(model, **call):
    def step(input_ids):
        loss = model(input_ids=input_ids, labels=input_ids, **call).loss
        return loss + 1e-3 * ac.aux_loss(model)

    return step


def run(step, x, model):
    model.zero_grad(set_to_none=True)
    loss = step(x)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(eager, compiled, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(compiled[0], eager[0], rtol=rtol, atol=atol)
    assert eager[1].keys() == compiled[1].keys() and eager[1]
    for name in eager[1]:
        torch.testing.assert_close(compiled[1][name], eager[1][name], rtol=rtol, atol=atol, msg=name)


def compiled_once(arch: str, backend: str, **kw):
    model = adapted(arch, **kw)
    x = ids(2, 12)
    step = step_fn(model)
    eager = run(step, x, model)
    counter = CompileCounterWithBackend(backend)
    compiled = run(torch.compile(step, backend=counter, fullgraph=True), x, model)
    assert counter.frame_count == 1, f"{counter.frame_count} frames: graph breaks"
    assert_same(eager, compiled)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_fullgraph_one_frame_matches_eager(arch):
    """Dynamo and AOTAutograd (the op's body traced, forward and backward) for every architecture."""
    model = compiled_once(arch, "aot_eager")
    assert ac.aux_loss(model).item() > 0  # aux recorded inside the compiled graph


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_inductor_matches_eager(arch):
    """Inductor's lowering of the same graphs (an unfused and a fused-QKV architecture)."""
    compiled_once(arch, "inductor")


@pytest.mark.parametrize("method", ["mole", "lora"])
def test_other_methods_compile(method):
    compiled_once("llama", "aot_eager", method=method)


def _frames_over_shapes(model, step, shapes) -> int:
    counter = CompileCounterWithBackend("aot_eager")  # recompiles are decided by dynamo, whatever the backend
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    for batch, seq in shapes:
        compiled(ids(batch, seq)).backward()
    return counter.frame_count


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dynamic_shapes_add_no_recompiles(arch):
    shapes = [(2, 8), (3, 8), (2, 13)]
    base = small(arch).train()
    base_frames = _frames_over_shapes(base, lambda x: base(input_ids=x, labels=x).loss, shapes)
    torch._dynamo.reset()
    model = adapted(arch)
    frames = _frames_over_shapes(model, step_fn(model), shapes)
    assert frames <= base_frames, f"adapters add recompiles: {frames} frames vs {base_frames} for the base model"


def test_bf16_autocast():
    model = adapted("llama")
    x = ids(2, 12)
    step = step_fn(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = run(step, x, model)
        counter = CompileCounterWithBackend("aot_eager")
        compiled = run(torch.compile(step, backend=counter, fullgraph=True), x, model)
    assert counter.frame_count == 1
    assert_same(eager, compiled, rtol=3e-2, atol=3e-2)


def test_gradient_checkpointing_under_compile():
    model = adapted("llama")
    plain = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()  # HF's requires_grad_ hook breaks any compiled graph, adapters or not
    x = ids(2, 12)
    eager_plain = run(step_fn(plain, use_cache=False), x, plain)
    step = step_fn(model, use_cache=False)
    eager = run(step, x, model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = run(torch.compile(step, backend=counter, fullgraph=True), x, model)
    assert counter.frame_count == 1
    assert_same(eager_plain, eager)  # checkpointing changes no gradient
    assert_same(eager, compiled)
