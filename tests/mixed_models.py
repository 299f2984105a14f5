"""Models with several named adapters of different sizes and methods, for the mixed-batch tests (PyTorch and
ONNX)."""

from __future__ import annotations

import torch

import amole_compile as ac

from models import build, logits

CFGS = {
    "a": ac.AdaMoLEConfig(num_experts=4, rank=2, roles=("q", "v")),
    "b": ac.AdaMoLEConfig(num_experts=3, rank=4, method="mole", top_k=2, roles=("q", "k", "v", "o")),
    "c": ac.AdaMoLEConfig(method="lora", rank=3, roles=("k", "o")),
    "d": ac.AdaMoLEConfig(num_experts=2, rank=1, max_threshold=0.9),
}
ROWS = ["a", "b", None, "c", "a", "d"]


def adapted(arch="llama", names=("a", "b", "c", "d"), layers: int | None = None):
    """The base (`models.build(arch)`, with `layers` decoder layers where given: an ONNX export of a 2-layer model
    with all four adapters stacked takes 1-3 minutes on 2 cores, a 1-layer one about half) with the adapters
    `names`, each randomized."""
    torch.manual_seed(0)  # the same base whatever ran before (module-scoped fixtures build it before any seeding)
    model = build(arch) if layers is None else build(arch, num_hidden_layers=layers)
    for i, name in enumerate(names):
        ac.transform(model, CFGS[name], adapter_name=name)
        randomize(model, name, seed=i)
    return model.eval()


def randomize(model, name, seed, b_scale=0.2):
    """Adapter `name`'s weights drawn at random (seeded), so that adapters differ and a wrong one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".adapters.{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * (b_scale if n.endswith("lora_B") else 1.0))


def per_row(model, x, rows, **kw):
    """Each row's logits with its adapter active (the whole batch run once per adapter)."""
    out = torch.empty(*x.shape, model.config.vocab_size)
    for name in set(rows):
        ac.set_active_adapter(model, name)
        full = logits(model, x, **kw)
        for i, r in enumerate(rows):
            if r == name:
                out[i] = full[i]
    return out
