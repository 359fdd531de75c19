"""Sinkhorn-Knopp teacher targets for the DINO and iBOT heads (official
`dinov3/loss/dino_clstoken_loss.py::sinkhorn_knopp_teacher` and `dinov3/loss/ibot_patch_loss.py`).

The official code turns teacher logits t [N, K] into Q = exp(t / temp)ᵀ [K, N], divides Q by its
global sum, then runs `n_iters` rounds of: divide each prototype row by its row sum (all-reduced
over the process group) and by K; divide each sample column by its (local) column sum and by
B_tot. Finally Q * B_tot is transposed so each sample's distribution sums to 1.

Overflow guard: the official code does no max-subtraction, so exp overflows once a logit / temp
exceeds ~88 in fp32. Here each prototype's scaled logits are shifted by their maximum over the
global batch (all-reduced with MAX) before the exp. That multiplies the prototype's row of Q by
a constant, which the first row normalisation undoes exactly, so the result is the official one,
without the overflow; every row then holds an exp(0) = 1 entry, so no row sum can be zero. For the
same reason the official division by the global sum cancels and is skipped (one all-reduce fewer). A sample whose every scaled logit lies
~87 below its prototype's batch maximum still underflows to a zero column and gives NaN, as in
the official code: that is a model gone wrong, and the training loop's NaN guard should see it.

B_tot (`n_samples_total`) only sets the scale of the intermediate joint distribution (the final
column normalisation removes it); it is kept so the intermediates match the official ones.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from gramline.errors import InputError


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Size of `group` (default: the world) when torch.distributed is initialised, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def _all_reduce(x: Tensor, op: dist.ReduceOp.RedOpType, group: dist.ProcessGroup | None) -> Tensor:
    if world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor,
    temp: float,
    n_iters: int = 3,
    n_samples_total: Tensor | int | None = None,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Balanced teacher targets [N, K] (each row sums to 1) from teacher logits [N, K].

    Args:
        teacher_logits: this rank's teacher logits, any float dtype; cast to fp32.
        temp: teacher temperature (> 0).
        n_iters: Sinkhorn-Knopp iterations (>= 1; the recipe uses 3).
        n_samples_total: B_tot, the number of samples over all ranks. Default N * world size
            (the DINO form); iBOT passes the all-reduced number of masked patches, since ranks
            hold different counts.
        group: process group for the all-reduces; default the world. Without an initialised
            process group (or with a group of size 1) everything is local.

    Every rank of the group must call this (collectives), even one holding N = 0 samples.
    """
    if not temp > 0:
        raise InputError("sinkhorn_knopp temp", f"is {temp}", "a teacher temperature > 0")
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
        raise InputError("sinkhorn_knopp n_iters", f"is {n_iters!r}", "an integer >= 1")
    if teacher_logits.ndim != 2:
        raise ValueError(f"teacher_logits must be [N, K], got shape {tuple(teacher_logits.shape)}")

    device = teacher_logits.device
    with torch.autocast(device_type=device.type, enabled=False):
        # Kept in the input's [N, K] layout (contiguous): the official Q is this transposed, so
        # its row operations (per prototype) are dim 0 here and its column operations dim 1.
        q = teacher_logits.detach().float() / temp
        n_local, n_prototypes = q.shape

        proto_max = q.amax(dim=0) if n_local > 0 else q.new_full((n_prototypes,), float("-inf"))
        proto_max = _all_reduce(proto_max, dist.ReduceOp.MAX, group)
        q.sub_(proto_max).exp_()

        if n_samples_total is None:
            b_tot: Tensor | float = float(n_local * world_size(group))
        elif isinstance(n_samples_total, Tensor):
            b_tot = n_samples_total.detach().to(device=device, dtype=torch.float32).reshape(())
        else:
            b_tot = float(n_samples_total)

        for _ in range(n_iters):
            proto_sum = _all_reduce(q.sum(dim=0), dist.ReduceOp.SUM, group)
            q.div_(proto_sum).div_(n_prototypes)
            q.div_(q.sum(dim=1, keepdim=True)).div_(b_tot)
        return q.mul_(b_tot)
