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


def wrap_model(model: nn.Module, world: World, strategy: str, device: torch.device,
               compute_dtype: torch.dtype = torch.float32, reduce_dtype: str = "float32") -> nn.Module:
    """DDP (replicated) or FSDP2 ``fully_shard`` (sharded per block) when world.size > 1.

    ``compute_dtype`` (the autocast dtype) is FSDP2's parameter dtype for the all-gathers, so a bf16 run
    moves bf16 weights instead of fp32 ones; ``reduce_dtype`` is the dtype gradients are averaged in
    (DDP: a bf16 compression hook; FSDP2: the reduce-scatter), halving the traffic at ``bfloat16``."""
    if reduce_dtype not in ("float32", "bfloat16"):    # checked on one process too: a typo fails early
        raise ConfigError(f"train.grad_reduce_dtype must be float32 or bfloat16, got {reduce_dtype!r}")
    if world.size == 1:
        return model
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
        if reduce_dtype == "bfloat16":
            ddp.register_comm_hook(None, bf16_allreduce_hook)
        return ddp
    if strategy == "fsdp":
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError as e:  # torch < 2.6
            raise ConfigError("train.distributed='fsdp' needs torch>=2.6 (FSDP2 fully_shard)") from e
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=getattr(torch, reduce_dtype))
        for block in getattr(model, "blocks", []):
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    raise ConfigError(f"train.distributed: unknown {strategy!r}; allowed: ddp, fsdp")


def bf16_allreduce_hook(group, bucket):  # noqa: ANN001, ANN201 (DDP rejects string annotations)
    """DDP comm hook: average a gradient bucket in bf16 (half the bytes) and write it back in place.

    torch's own ``bf16_compress_hook`` refuses anything but NCCL; this one also runs on gloo (tests)."""
    buf = bucket.buffer()
    low = buf.to(torch.bfloat16).div_(dist.get_world_size(group))
    fut = dist.all_reduce(low, group=group, async_op=True).get_future()
    return fut.then(lambda f: buf.copy_(f.value()[0]))


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
