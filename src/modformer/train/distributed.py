"""torchrun integration: process group set-up, DDP / FSDP2 wrapping, rank helpers.

One code path: with no torchrun environment the world has size 1 and nothing is wrapped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from modformer.registry import ConfigError


@dataclass
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device_type: str) -> World:
    """Join the process group torchrun describes (nccl on GPU, gloo on CPU); no-op otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return World(rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")), size=size)


def wrap_model(model: nn.Module, world: World, strategy: str, device: torch.device) -> nn.Module:
    """DDP (replicated) or FSDP2 ``fully_shard`` (sharded per block) when world.size > 1."""
    if world.size == 1:
        return model
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as e:  # torch < 2.6
            raise ConfigError("train.distributed='fsdp' needs torch>=2.6 (FSDP2 fully_shard)") from e
        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)
        return model
    raise ConfigError(f"train.distributed: unknown {strategy!r}; allowed: ddp, fsdp")


def all_reduce_sum(values: list[float], device: torch.device, world: World) -> list[float]:
    if world.size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def shutdown(world: World) -> None:
    """Leave the process group together: a rank that tears gloo down while another still finishes its
    report aborted ("terminate called without an active exception") once on a loaded 2-core machine."""
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
