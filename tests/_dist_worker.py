"""Worker for tests/test_distributed.py, started by torchrun (2 CPU processes, gloo):

    python -m torch.distributed.run --nproc_per_node 2 tests/_dist_worker.py OUT_DIR

Trains a transformed tiny llama for STEPS AdamW steps on a fixed global batch split across ranks, once wrapped in
DDP and once sharded with FSDP2 (`fully_shard`), and writes each rank's final adapter state (full tensors) and
per-step losses to OUT_DIR/<mode>_rank<r>.pt; rank 0 also writes the wrapped model's `base_state_dict` (gathered
under FSDP2) to OUT_DIR/<mode>_base.pt.
The test imports `build_model`, `global_batch`, `shards` and `train` from here for the single-process reference.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import amole_compile as ac

from models import build, ids

STEPS = 3
LR = 1e-2
GLOBAL_BATCH, SEQ = 4, 10
# A large aux coefficient makes the comparison sensitive to how the aux loss is reduced across ranks (the aux
# loss of the whole batch is not the mean of the shards' aux losses); 1e-3 would hide a mismatch in the noise.
AUX_COEF = 0.5


def build_model() -> nn.Module:
    """The same transformed tiny llama in every process: fixed seed, no dropout, nonzero lora_B, train mode."""
    torch.manual_seed(0)
    model = ac.transform(build("llama", attention_dropout=0.0), ac.AdaMoLEConfig(dropout=0.0, aux_loss_coef=AUX_COEF))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.train()


def global_batch() -> torch.Tensor:
    return ids(GLOBAL_BATCH, SEQ, seed=3)


def shards(batch: torch.Tensor, world: int) -> list[torch.Tensor]:
    return list(batch.chunk(world))


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters as full CPU tensors (an FSDP2 DTensor is gathered: a collective)."""
    out = {}
    for name, p in model.named_parameters():
        if ".adapters." in name:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name.removeprefix("module.")] = full.detach().cpu().clone()
    return out


def train(model: nn.Module, batches: list[list[torch.Tensor]]) -> list[float]:
    """AdamW steps; step i minimises the mean over `batches[i]` of (task loss + AUX_COEF * aux loss) of each
    micro-batch. One micro-batch per step on each rank in the distributed runs (the gradient all-reduce averages
    the ranks), every shard of the global batch in the single-process reference."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    losses = []
    for micro in batches:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for x in micro:
            loss = model(input_ids=x, labels=x).loss / len(micro)
            loss.backward()
            total += loss.item()
        opt.step()
        losses.append(total)
    return losses


def wrap(model: nn.Module, mode: str) -> nn.Module:
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def run(mode: str, out_dir: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = wrap(build_model(), mode)
    mine = shards(global_batch(), world)[rank]
    losses = train(model, [[mine]] * STEPS)
    state = adapter_state(model)
    torch.save({"losses": losses, "state": state}, os.path.join(out_dir, f"{mode}_rank{rank}.pt"))
    base = ac.base_state_dict(model)  # FSDP2: every rank gathers the shards
    if rank == 0:
        torch.save({k: v.cpu() for k, v in base.items()}, os.path.join(out_dir, f"{mode}_base.pt"))


def main() -> None:
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for mode in sys.argv[2:] or ("ddp", "fsdp2"):
            run(mode, out_dir)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Every result is written and the process group destroyed. Under load, gloo's threads can still abort the
    # interpreter's teardown ("terminate called without an active exception", SIGABRT with no Python frame, 1 run
    # in ~20 on 2 busy cores, before and after issue 21's changes), which torchrun reports as a failed rank: leave
    # without the teardown. An exception above still exits non-zero with its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
