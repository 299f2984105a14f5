"""One training step (forward, loss + aux, backward, AdamW) of a Llama-shaped model, side by side:

    amole eager       AdaMoLE E=8 r=4 on q, k, v, o (transform)
    amole compiled    the same under torch.compile(fullgraph=True)
    peft lora         PEFT LoRA with the same total rank (r = E * rank) on q, k, v, o (eager and compiled)
    loop adamole      the reference's loop over experts (tests/upstream_loop.py)
    frozen base       no adapters; only layer 0's input norm trains, so the backward still runs through every
                      layer (the floor any adapter method pays)

Prints step-time ratios against PEFT LoRA, each adapter method's overhead over the frozen base (ms/step above
it, and the loop's overhead over ours), and the memory each needs; appends a CSV row.
Memory: on CUDA the peak allocated; on CPU, parameters + gradients + AdamW state + the bytes saved for backward
(unique storages, counted with saved-tensor hooks; compiled graphs are not hookable, so '-').

    python benchmarks/train_step.py [--device cuda] [--hidden 512 --layers 4 --seq 128 --batch 8] [--vocab 1000]
    python benchmarks/train_step.py --quantize nf4      # bitsandbytes 4-bit base (or int8: torchao int8
                                                         # weight-only): amole vs PEFT LoRA on the same base
    ... --clock process --threads 1                      # CPU time of this process, one thread: on a shared
                                                         # machine wall time measures the other load too

--vocab 1000 is the small-vocabulary configuration: with the default 32000 words the LM head is most of the step
and hides the adapters' cost.

The model's loss holds AdaMoLE's aux term (AdaMoLEConfig.aux_loss_coef); the loop adds its own.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import amole_compile as ac

import _common as bc
from upstream_loop import LoopAdaMoLE, LoopLinear

ROLES = ("q_proj", "k_proj", "v_proj", "o_proj")


def llama(hidden: int, layers: int, device: str, vocab: int = 32000) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                      num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 64, 1))
    return AutoModelForCausalLM.from_config(cfg).to(device)


def loop_model(base: nn.Module, experts: int, rank: int, dropout: float) -> nn.Module:
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, mod in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in ROLES:
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, LoopLinear(mod, experts, rank, 16.0, dropout))
    return model


def peft_model(base: nn.Module, rank: int, dropout: float, copy_base: bool = True) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base) if copy_base else base
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=16, lora_dropout=dropout, target_modules=list(ROLES)))


def quantized_models(base: nn.Module, args, cfg) -> dict:
    """AdaMoLE, PEFT LoRA (same total rank) and the frozen base, each on its own quantized load of `base`."""
    import tempfile

    import transformers as tf

    with tempfile.TemporaryDirectory() as d:
        base.save_pretrained(d)

        def load():
            if args.quantize == "nf4":
                q = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32)
            else:
                from torchao.quantization import Int8WeightOnlyConfig

                q = tf.TorchAoConfig(Int8WeightOnlyConfig())
            return tf.AutoModelForCausalLM.from_pretrained(d, quantization_config=q, device_map=args.device)

        frozen = load()
        for p in frozen.parameters():
            p.requires_grad_(False)
        frozen.model.layers[0].input_layernorm.weight.requires_grad_(True)
        return {
            "amole eager": (ac.transform(load(), cfg), False, False),
            "peft lora": (peft_model(load(), args.experts * args.rank, args.dropout, copy_base=False), False, False),
            "frozen base": (frozen, False, False),
        }


def frozen_base(base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.layers[0].input_layernorm.weight.requires_grad_(True)
    return model


def aux_of(model: nn.Module):
    if any(isinstance(m, LoopAdaMoLE) for m in model.modules()):
        return sum(m.layer_loss for m in model.modules() if isinstance(m, LoopAdaMoLE))
    return ac.aux_loss(model)


def make_step(model: nn.Module, ids: torch.Tensor, compiled: bool, uses_aux: bool):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def loss_fn(x):
        loss = model(input_ids=x, labels=x).loss
        return loss + 1e-3 * aux_of(model) if uses_aux else loss

    fwd = torch.compile(loss_fn, fullgraph=True) if compiled else loss_fn

    def step():
        opt.zero_grad(set_to_none=True)
        fwd(ids).backward()
        opt.step()

    return step, loss_fn, opt


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: a tensor subclass (torchao's quantized weights) counts its inner tensors, not its
    logical dtype."""
    inner = t.data if isinstance(t, nn.Parameter) else t
    if type(inner) is not torch.Tensor and hasattr(inner, "__tensor_flatten__"):
        names, _ = inner.__tensor_flatten__()
        return sum(tensor_bytes(getattr(inner, n)) for n in names)
    return t.numel() * t.element_size()


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    params = sum(tensor_bytes(p) for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    states = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor))
    return params + grads + states


def saved_bytes(loss_fn, ids) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(ids)
    del loss
    return sum(seen.values())


def memory(name: str, model, loss_fn, opt, ids, device: str, step) -> float | None:
    """MiB needed by one training step of this contender."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    if "compiled" in name:
        return None
    return (state_bytes(model, opt) + saved_bytes(loss_fn, ids)) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000,
                    help="1000: the small-vocabulary configuration, where the LM head does not hide the adapters")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quantize", choices=("nf4", "int8"), default=None,
                    help="quantized base: bitsandbytes nf4, or torchao int8 weight-only")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="process: this process's CPU time per step (CPU; robust to other load on a shared machine)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--skip", default="", help="comma-separated contenders to leave out (e.g. 'loop adamole')")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = llama(args.hidden, args.layers, args.device, args.vocab)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    cfg = ac.AdaMoLEConfig(num_experts=args.experts, rank=args.rank, dropout=args.dropout)
    if args.quantize:
        models = quantized_models(base, args, cfg)
    else:
        models = {
        "amole eager": (ac.transform(copy.deepcopy(base), cfg), False, False),  # the model's loss holds the aux
        "amole compiled": (ac.transform(copy.deepcopy(base), cfg), True, False),
        "peft lora": (peft_model(base, args.experts * args.rank, args.dropout), False, False),
        "peft lora compiled": (peft_model(base, args.experts * args.rank, args.dropout), True, False),
        "loop adamole": (loop_model(base, args.experts, args.rank, args.dropout), False, True),
        "frozen base": (frozen_base(base), False, False),
        "frozen base compiled": (frozen_base(base), True, False),
        }
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    models = {k: v for k, v in models.items() if k not in skip}
    steps, mem = {}, {}
    for name, (model, compiled, uses_aux) in models.items():
        step, loss_fn, opt = make_step(model, ids, compiled, uses_aux)
        steps[name] = step
        step()  # compile / allocate optimizer state before measuring
        mem[name] = memory(name, model, loss_fn, opt, ids, args.device, step)
    times = bc.interleaved(steps, args.steps, args.warmup, args.device, args.clock)
    print_table(args, times, mem)
    row = {"device": bc.device_name(args.device), "quantize": args.quantize or "", "hidden": args.hidden,
           "layers": args.layers, "seq": args.seq, "batch": args.batch, "vocab": args.vocab, "experts": args.experts,
           "rank": args.rank, "clock": args.clock}
    for name, t in times.items():
        row[f"{name} ms"] = round(t * 1e3, 2)
        row[f"{name} MiB"] = round(mem[name], 1) if mem[name] else ""
    print(f"appended to {bc.append_row('train_step', row)}")


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(args, times: dict[str, float], mem: dict[str, float | None]) -> None:
    def same_mode(name: str, ref: str) -> float | None:
        return times.get(f"{ref} compiled" if "compiled" in name else ref)

    ref_m = mem.get("peft lora")
    rows = []
    for name, t in times.items():
        lora, base = same_mode(name, "peft lora"), same_mode(name, "frozen base")
        over = (t - base) * 1e3 if base is not None else None
        m = mem[name]
        rows.append([name, f"{t * 1e3:.1f}", _fmt(lora and t / lora, ".3f"), _fmt(over, ".1f"),
                     _fmt(m, ".1f"), _fmt(m / ref_m if m and ref_m else None, ".3f")])
    quant = (f", {args.quantize} base" if args.quantize else "") + (", process CPU time" if args.clock == "process"
                                                                     else "")
    print(f"train step{quant}, Llama-shaped hidden={args.hidden} layers={args.layers} seq={args.seq} "
          f"batch={args.batch} vocab={args.vocab}, "
          f"E={args.experts} r={args.rank} dropout={args.dropout}, {bc.device_name(args.device)}")
    print(bc.table(rows, ["contender", "ms/step", "x peft lora (same mode)", "ms over frozen base", "memory MiB",
                          "mem x lora"]))
    base, ours, loop = (times.get(k) for k in ("frozen base", "amole eager", "loop adamole"))
    if None not in (base, ours, loop) and ours > base:
        print(f"adapter overhead, loop / ours (eager): {(loop - base) / (ours - base):.2f}x; "
              f"whole step, loop / ours: {loop / ours:.2f}x")


if __name__ == "__main__":
    main()
