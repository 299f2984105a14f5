"""Compiled training: a small Llama learns the demo's synthetic routing task under torch.compile(fullgraph=True).

    python examples/train_compiled.py [--steps 150]
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import amole_compile as ac
from amole_compile.cli.demo import VOCAB, synthetic_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)
    model = AutoModelForCausalLM.from_config(cfg)
    ac.transform(model, ac.AdaMoLEConfig(num_experts=8, rank=4, dropout=0.05))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    ac.reset_expert_stats(model, passes="train")  # count the training forwards (the default counts eval ones)

    @torch.compile(fullgraph=True)
    def loss_fn(ids):
        total = model(input_ids=ids, labels=ids).loss  # the task loss + 1e-3 * aux (AdaMoLEConfig.aux_loss_coef)
        return total - 1e-3 * ac.aux_loss(model).detach(), total

    gen = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for step in range(args.steps):
        loss, total = loss_fn(synthetic_batch(16, 24, VOCAB, gen))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  aux {ac.aux_loss(model).item():.3f}  "
                  f"mean active experts {ac.expert_stats(model).mean_active:.2f} (since the last line)")
            ac.reset_expert_stats(model)
    print(f"{args.steps} compiled steps in {time.perf_counter() - t0:.1f} s (compilation included)")


if __name__ == "__main__":
    main()
