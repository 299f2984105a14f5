"""The model as a training loop holds it: wrappers to look through, shards to gather."""

from __future__ import annotations

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / FSDP1 (`.module`) and torch.compile (`._orig_mod`) wrappers.

    FSDP2 (`fully_shard`) shards the module in place and is returned as is.
    """
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or \
                type(model).__name__ == "FullyShardedDataParallel":
            model = model.module
        else:
            return model


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 shard) gathered to a full tensor (a collective: every rank must call); others as is."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(value, DTensor):
            return value.full_tensor()
    return value
