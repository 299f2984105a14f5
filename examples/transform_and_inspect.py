"""Transform a small Llama built from config, list what was adapted, train a few steps, save and reload.

    python examples/quickstart.py
"""

import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import amole_compile as ac


def main() -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = ac.transform(AutoModelForCausalLM.from_config(cfg), ac.AdaMoLEConfig(num_experts=8, rank=4))
    for t in ac.targets(model):
        print(t.describe())
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable parameters: {sum(p.numel() for p in trainable):,} of {total:,}")
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, 256, (4, 32))
    model.train()
    for step in range(5):
        total = model(input_ids=ids, labels=ids).loss  # includes 1e-3 * aux (AdaMoLEConfig.aux_loss_coef)
        loss = total - 1e-3 * ac.aux_loss(model).detach()
        opt.zero_grad()
        total.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f} aux {ac.aux_loss(model).item():.4f}")
    with tempfile.TemporaryDirectory() as d:
        ac.save_adapters(model, d)
        fresh = AutoModelForCausalLM.from_config(cfg)
        fresh.load_state_dict(ac.base_state_dict(model), strict=True)  # the base weights under their own names
        reloaded = ac.load_adapters(fresh, d)
        model.eval()
        reloaded.eval()
        same = torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
        print(f"saved to {d}; reloaded model gives identical logits: {same}")


if __name__ == "__main__":
    main()
