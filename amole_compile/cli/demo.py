"""`amole-compile demo`: the whole job on an embedded default, no downloads.

A small Llama built from config learns a synthetic task in which routing matters: each sequence starts with one
of four task tokens, and the task decides the rule for every following token (step +1, step -1, step +3, or
repeat the token before last). Only the adapters train (under torch.compile); then the demo saves the expert
statistics and their plot, the adapters, an ONNX scoring graph (checked against PyTorch with onnxruntime) and a
KV-cache decoding graph that `OnnxLM` generates from (checked against PyTorch greedy decoding).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .checks import check_demo

TASKS = 4
FIRST_BODY = 8  # token ids below this are reserved for task markers
VOCAB = 32
EVAL_ROWS = 64


class DemoCheckFailed(RuntimeError):
    """One of the demo's checks (training lowered the loss, ONNX matches PyTorch, ...) failed."""


def synthetic_batch(batch: int, seq: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, seq] token ids: a task marker, then tokens following the task's rule (wrapping in the body range)."""
    span = vocab - FIRST_BODY
    task = torch.randint(0, TASKS, (batch,), generator=gen)
    body = torch.empty(batch, seq - 1, dtype=torch.long)
    body[:, :2] = torch.randint(0, span, (batch, 2), generator=gen)
    step = torch.tensor([1, -1, 3, 0])[task]
    for t in range(2, seq - 1):
        nxt = (body[:, t - 1] + step) % span
        body[:, t] = torch.where(task == 3, body[:, t - 2], nxt)
    return torch.cat([task[:, None], body + FIRST_BODY], dim=1)


def _model(args):
    from transformers import AutoModelForCausalLM, LlamaConfig

    heads = max(args.hidden // 16, 1)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.loss_type = "ForCausalLM"
    return model


def _train(model, args, ac):
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(args.seed + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)  # without it the loss climbs late
    model.train()

    def step(ids):
        total = model(input_ids=ids, labels=ids).loss  # the task loss + 1e-3 * aux (AdaMoLEConfig.aux_loss_coef)
        return total - 1e-3 * ac.aux_loss(model).detach(), total

    run = step if args.no_compile else torch.compile(step, fullgraph=True)
    if not args.no_compile:
        print("compiling the training step with torch.compile (the first step takes a minute or more on CPU) ...",
              flush=True)
    losses, bar = [], tqdm(range(args.steps), desc="train", unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    for i in bar:
        loss, total = run(synthetic_batch(16, 24, VOCAB, gen))
        if i == 0:
            bar.write(f"first step{'' if args.no_compile else ' (compiled)'}: {time.perf_counter() - start:.1f} s")
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if i % 10 == 0 or i == args.steps - 1:  # active: mean experts per token over the last 10 steps
            bar.set_postfix({"loss": f"{loss.item():.3f}",
                             "active (last 10 steps)": f"{ac.expert_stats(model).mean_active:.2f}"})
            ac.reset_expert_stats(model)
    model.eval()
    return losses


def _eval_stats(model, args, ac):
    """The expert statistics of one eval-mode pass over held-out sequences (a seed training never draws)."""
    ac.reset_expert_stats(model, passes="eval")
    ids = synthetic_batch(EVAL_ROWS, 24, VOCAB, torch.Generator().manual_seed(args.seed + 7919))
    with torch.no_grad():
        model(input_ids=ids)
    return ac.expert_stats(model).over(f"one pass over {EVAL_ROWS} held-out sequences ({ids.numel()} tokens) "
                                       "after training")


def _check(ok: bool, what: str, failures: list[str]) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}")
    if not ok:
        failures.append(what)


def _serve(model, out: Path, failures: list[str]) -> dict[str, Path]:
    import amole_compile as ac

    gen = torch.Generator().manual_seed(1234)
    ids = synthetic_batch(3, 20, VOCAB, gen)
    onnx_path = ac.export_onnx(model, out / "model.onnx")
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    got = torch.from_numpy(ac.OnnxLM(onnx_path).logits(ids.numpy()))
    err = (got - ref).abs().max().item()
    _check(err < 1e-3, f"onnxruntime logits match PyTorch (max abs diff {err:.2e})", failures)
    dec_path = ac.export_onnx(model, out / "decoder.onnx", kv_cache=True)
    prompt = ids[:1, :10]
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    sample = torch.as_tensor(ac.OnnxLM(dec_path).generate(prompt.numpy(), max_new_tokens=12))
    _check(torch.equal(sample, want), "OnnxLM greedy generation equals PyTorch generate()", failures)
    print(f"  prompt    {prompt[0].tolist()}")
    print(f"  generated {sample[0, prompt.shape[1]:].tolist()}")
    return {"scoring graph": onnx_path, "decoding graph": dec_path}


def _quiet() -> None:
    """The demo prints its own progress; silence library chatter (torch.onnx's registry, deprecations)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torch.onnx", "torch._dynamo", "torch._inductor", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_demo(args) -> int:
    """`amole-compile demo`: build, transform, train, export, serve and check (see the module doc)."""
    import amole_compile as ac

    check_demo(args)  # main ran it already; direct callers get it too
    out = Path(args.out)
    _quiet()
    t0 = time.perf_counter()
    failures: list[str] = []
    model = _model(args)
    ac.transform(model, ac.AdaMoLEConfig(num_experts=args.experts, rank=args.rank, dropout=0.0))
    print("adapted projections:")
    for t in ac.targets(model):
        print(f"  {t.describe()}")
    sites = sum(len(t.roles) for t in ac.targets(model))
    _check(sites == 4 * args.layers, f"{sites} role sites found (q, k, v, o in each of {args.layers} layers)",
           failures)
    ac.reset_expert_stats(model, passes="train")  # the bar's `active`: training forwards, last 10 steps
    losses = _train(model, args, ac)
    head, tail = sum(losses[:10]) / min(10, len(losses)), sum(losses[-10:]) / min(10, len(losses))
    _check(tail < head, f"training lowered the loss ({head:.3f} -> {tail:.3f})", failures)
    stats = _eval_stats(model, args, ac)
    files = {"expert statistics": stats.save(out / "expert_stats.json")}
    print(stats.table())
    try:
        files["expert plot"] = ac.plot_expert_stats(stats, out / "experts.png",
                                                    title="AdaMoLE demo: active experts per token")
    except ImportError as exc:
        print(f"  (no plot: {exc})")
    files["adapters"] = ac.save_adapters(model, out / "adapters")
    files.update(_serve(model, out, failures))
    print("files:")
    for what, path in files.items():
        print(f"  {what:<20} {path}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s: "
          f"{'all checks passed' if not failures else f'{len(failures)} check(s) failed'}")
    if failures:
        raise DemoCheckFailed(f"demo checks failed: {'; '.join(failures)}")
    return 0
