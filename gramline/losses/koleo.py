"""KoLeo regulariser on the student's pre-head CLS tokens (official `dinov3/loss/koleo_loss.py`).

The loss spreads features on the unit sphere: -mean log(distance to the nearest neighbour).
Neighbours are found by the largest dot product with self excluded; indices are picked without
gradient and the distance is differentiated through both the sample and its neighbour.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from gramline.errors import InputError
from gramline.losses.sinkhorn import world_size


def _nn_log_distance(queries: Tensor, candidates: Tensor, excluded: Tensor, eps: float) -> Tensor:
    """-log(‖q − c_nn‖ + eps) per query [Q]; `excluded` [Q, C] marks candidates not allowed."""
    with torch.no_grad():
        dots = (queries @ candidates.t()).masked_fill_(excluded, float("-inf"))
        nearest = dots.argmax(dim=1)
    distance = torch.linalg.vector_norm(queries - candidates[nearest], dim=-1)
    return -torch.log(distance + eps)


def _check(x: Tensor, eps: float) -> None:
    if x.ndim != 2:
        raise ValueError(f"koleo features must be [B, D], got shape {tuple(x.shape)}")
    if not eps > 0:
        raise InputError("koleo eps", f"is {eps}", "a small positive number such as 1e-8")


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo loss of the features x [B, D] (B >= 2), neighbours searched within x, in fp32."""
    _check(x, eps)
    if x.shape[0] < 2:
        raise ValueError(f"koleo_loss needs at least 2 samples to find neighbours, got {x.shape[0]}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        z = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
        return _nn_log_distance(z, z, self_mask, eps).mean()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward hands each rank the summed gradient of its slice.

    Written on the public collectives because torch.distributed.nn.functional.all_gather is
    deprecated (and its suggested replacement is private). The backward all-reduces the full
    gradient rather than reduce-scattering it, which gloo supports; the tensors are [B, D] CLS
    features, so the extra traffic is negligible.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def _group_ids(n: int, group_size: int, device: torch.device) -> Tensor:
    ids = torch.arange(n, device=device) // group_size
    if n % group_size == 1 and n > 1:  # a lone trailing sample has no neighbour: join the previous group
        ids[-1] = ids[-2]
    return ids


def koleo_loss_distributed(x: Tensor, group_size: int, eps: float = 1e-8) -> Tensor:
    """KoLeo with features all-gathered over the ranks and neighbours searched within groups.

    x [B, D] is this rank's batch (equal B on every rank). The gathered batch (rank-major order)
    is cut into groups of `group_size` consecutive samples (the high-res phase uses 16); a
    trailing group may be smaller, and a lone trailing sample joins the previous group. The
    loss is the mean over this rank's samples, so the mean over ranks (what DDP's gradient
    averaging optimises) is the mean over all samples. The gather is autograd-aware: each
    sample also receives gradient as the neighbour of samples on other ranks. Every rank must
    call this. Without a process group it is KoLeo over groups of the local batch.
    """
    _check(x, eps)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise InputError("koleo group_size", f"is {group_size!r}", "an integer >= 2")
    n_ranks = world_size()
    local = x.shape[0]
    if local * n_ranks < 2:
        raise ValueError("koleo_loss_distributed needs at least 2 samples over all ranks")
    with torch.autocast(device_type=x.device.type, enabled=False):
        z = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        if n_ranks > 1:
            everything = _GatherWithGrad.apply(z)
            start = dist.get_rank() * local
        else:
            everything, start = z, 0
        every = torch.arange(everything.shape[0], device=z.device)
        mine = every[start : start + local]
        ids = _group_ids(everything.shape[0], group_size, z.device)
        excluded = (ids[mine, None] != ids[None, :]) | (mine[:, None] == every[None, :])
        return _nn_log_distance(z, everything, excluded, eps).mean()
