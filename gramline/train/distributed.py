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


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def compile_blocks(model: nn.Module) -> None:
    """Compile each transformer block and each head in place (`torch.compile`), as the recipe does."""
    for block in model.backbone.vit.blocks:
        block.compile()
    for head in model.heads().values():
        head.compile()


def shard(module: nn.Module, param_dtype: torch.dtype | None = None, inference: bool = False) -> None:
    """FSDP2 in place over the world: each transformer block, each head and the backbone's own
    parameters (patch embedding, tokens, norm) are their own units, then the root. `module` is a
    model with `backbone` and `heads()` or a bare backbone. `param_dtype` (bf16 on CUDA) is the
    compute dtype; gradients are reduced in fp32. `inference`: every unit, the root included, frees
    its gathered parameters right after forward (FSDP2 otherwise keeps the root's for backward)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    options = {"mp_policy": policy, **({"reshard_after_forward": True} if inference else {})}
    backbone = getattr(module, "backbone", module)
    for block in backbone.vit.blocks:
        fully_shard(block, **options)
    for head in module.heads().values() if hasattr(module, "heads") else ():
        fully_shard(head, **options)
    if backbone is not module:
        fully_shard(backbone, **options)
    fully_shard(module, **options)
    register_fsdp_forward_method(backbone, "forward_group")  # teachers call it directly


def param_dtype(env: DistEnv, autocast_dtype: torch.dtype | None) -> torch.dtype | None:
    """FSDP2's compute dtype: the autocast dtype on CUDA (bf16 parameters, fp32 reduction), else none."""
    return autocast_dtype if env.device.type == "cuda" else None


def parallelize(model: nn.Module, env: DistEnv, mode: str, compile: bool, also_shard: Sequence[nn.Module] = (),
                group: dist.ProcessGroup | None = None, group_size: int | None = None,
                dtype: torch.dtype | None = None) -> nn.Module:
    """The module to call in the training forward: `model` itself on one process (or a group of
    one) or under FSDP2 (then `model` and `also_shard`, its EMA teacher, are sharded in place, see
    `shard`), else DDP around it over `group` (default: the world, of `group_size` ranks).
    `compile`: each block and head of `model` is compiled first."""
    if compile:
        compile_blocks(model)
    if (group_size if group_size is not None else env.world_size) <= 1:
        return model
    if mode == "fsdp":
        for module in (model, *also_shard):
            shard(module, dtype)
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[env.device.index] if env.device.type == "cuda" else None, broadcast_buffers=False,
        process_group=group)
