"""Process-group setup for `torchrun` (gloo on CPU, NCCL on GPU), model wrapping (DDP, FSDP2) and
small collective helpers."""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_preference: str = "auto") -> DistEnv:
    """Initialise from torchrun's env vars when present; otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_preference in ("auto", "cuda")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistEnv(rank, world_size, local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if is_enabled():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if is_enabled():
        value = value.clone()
        dist.all_reduce(value)
    return value


def all_gather_objects(obj: object) -> list[object]:
    """`obj` of every rank, in rank order (`[obj]` on one process)."""
    if not is_enabled():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def parallelize(model: nn.Module, env: DistEnv, mode: str, compile_blocks: bool,
                also_shard: Sequence[nn.Module] = (), group: dist.ProcessGroup | None = None,
                group_size: int | None = None) -> nn.Module:
    """The module to call in the training forward: `model` itself on one process (or a group of
    one) or under FSDP2 (then `model` and `also_shard` are sharded block by block in place), else
    DDP around it over `group` (default: the world, of `group_size` ranks). `compile_blocks`
    compiles each transformer block and head (`torch.compile`)."""
    if compile_blocks:
        for block in model.backbone.vit.blocks:
            block.compile()
        for head in model.heads().values():
            head.compile()
    if (group_size if group_size is not None else env.world_size) <= 1:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in (model, *also_shard):
            for block in module.backbone.vit.blocks:
                fully_shard(block)
            fully_shard(module)
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[env.device.index] if env.device.type == "cuda" else None, broadcast_buffers=False,
        process_group=group)
