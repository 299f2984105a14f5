"""Data-parallel AdaMoLE training with DDP on torchrun: a tiny Llama built from config, a few AdamW steps.

    torchrun --nproc_per_node 2 examples/train_ddp.py
    torchrun --nproc_per_node 2 examples/train_ddp.py --steps 8 --out adapters/   # also save the adapters

CPU processes talk over gloo; with CUDA each process takes its GPU (LOCAL_RANK) and nccl. Every process builds
and transforms the same model (same seed; DDP also broadcasts rank 0's parameters), trains on its own share of
each global batch (DistributedSampler); the model's own loss holds AdaMoLE's aux loss of that share.
DDP averages the adapter gradients; the frozen base has none to sync. Rank 0 prints the loss averaged over ranks
and saves the adapters. FSDP2 works the same way: `fully_shard` each decoder layer, then the model.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from transformers import AutoModelForCausalLM, LlamaConfig

import amole_compile as ac

VOCAB, SEQ = 256, 32


def setup() -> torch.device:
    """Join the process group torchrun describes (env://): nccl on CUDA, gloo on CPU."""
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if not cuda:
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    return device


def build(device: torch.device) -> torch.nn.Module:
    """The same tiny Llama with AdaMoLE adapters on q, k, v, o in every process."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = ac.transform(AutoModelForCausalLM.from_config(cfg), ac.AdaMoLEConfig(num_experts=4, rank=4))
    return model.to(device).train()


def data(global_batch: int) -> DataLoader:
    """16 fixed random sequences; each rank gets global_batch / world of every global batch."""
    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randint(0, VOCAB, (16, SEQ), generator=g))
    sampler = DistributedSampler(ds, shuffle=True, seed=0)
    return DataLoader(ds, batch_size=global_batch // dist.get_world_size(), sampler=sampler)


def train(model: torch.nn.Module, loader: DataLoader, steps: int, device: torch.device) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    step, epoch = 0, 0
    while step < steps:
        loader.sampler.set_epoch(epoch)
        for (x,) in loader:
            x = x.to(device)
            loss = model(input_ids=x, labels=x).loss  # task + 1e-3 * aux (this rank's share)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP all-reduces (averages) the adapter gradients here
            opt.step()
            shown = loss.detach().clone()
            dist.all_reduce(shown)
            if dist.get_rank() == 0:
                print(f"step {step}: loss {shown.item() / dist.get_world_size():.4f}", flush=True)
            step += 1
            if step == steps:
                return
        epoch += 1


def run(args, device: torch.device) -> None:
    model = DistributedDataParallel(build(device), device_ids=[device.index] if device.type == "cuda" else None)
    if dist.get_rank() == 0:
        print(f"{dist.get_world_size()} processes ({dist.get_backend()}), {len(ac.targets(model.module))} "
              f"adapted projections", flush=True)
    train(model, data(args.global_batch), args.steps, device)
    if args.out and dist.get_rank() == 0:
        print(f"adapters saved to {ac.save_adapters(model.module, args.out)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--out", help="directory to save the trained adapters to (rank 0)")
    args = parser.parse_args()
    device = setup()
    try:
        # The DDP model lives and dies inside run(): freed while the process group still exists. Freed after
        # destroy_process_group (at exit), its reducer would drop the group's last reference and join gloo's
        # worker thread while holding the GIL, which deadlocks when that thread needs the GIL to free a work.
        run(args, device)
        dist.barrier()  # rank 0 may still be saving
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
