"""Which processes train which student, and moving one step's teacher outputs and crops between them.

Under `torchrun` the ranks are split into one group per student (`distill.ranks`, or by student
size). Every rank runs the teacher once on its own slice of the global batch; the slices' crops,
masks and teacher features are all-gathered, and each rank keeps its chunk: a student group of g
ranks splits the global batch into g chunks, so every student sees the whole global batch and no
teacher forward is repeated (official `dinov3/train/multidist_meta_arch.py::broadcast_to_subgroups`).
On one process every student trains there, on the whole batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from gramline.errors import InputError


@dataclass(frozen=True)
class StudentGroups:
    ranks: dict[str, tuple[int, ...]]  # student name → its ranks, in student order

    def chunk_of(self, rank: int) -> tuple[int, int]:
        """(index, count): this rank's chunk of the global batch within its student's group."""
        for ranks in self.ranks.values():
            if rank in ranks:
                return ranks.index(rank), len(ranks)
        raise ValueError(f"rank {rank} trains no student")


def assign_ranks(sizes: Mapping[str, int], world_size: int, requested: Mapping[str, Sequence[int]] | None,
                 global_batch: int) -> StudentGroups:
    """Student → ranks. `sizes`: each student's parameter count (automatic groups get ranks in
    proportion, at least one each, contiguous in student order)."""
    names = list(sizes)
    if world_size == 1:
        return StudentGroups({name: (0,) for name in names})
    if requested is not None:
        groups = {name: tuple(int(r) for r in requested.get(name, ())) for name in names}
        extra = sorted(set(requested) - set(names))
        flat = sorted(r for ranks in groups.values() for r in ranks)
        if extra or any(not ranks for ranks in groups.values()) or flat != list(range(world_size)):
            raise InputError("config field 'distill.ranks'", f"is {dict(requested)} for students {names} on "
                             f"{world_size} processes", "every student with at least one rank and every rank "
                             f"0..{world_size - 1} in exactly one student's list")
    else:
        if len(names) > world_size:
            raise InputError("config field 'distill.students'", f"has {len(names)} students for {world_size} "
                             "processes", "at most one student per process under torchrun (or one process, where "
                             "the students take turns)")
        counts = [1] * len(names)
        total = sum(sizes.values())
        for _ in range(world_size - len(names)):  # each spare rank to the student furthest below its share
            need = [sizes[n] / total * world_size - c for n, c in zip(names, counts)]
            counts[need.index(max(need))] += 1
        groups, start = {}, 0
        for name, count in zip(names, counts):
            groups[name] = tuple(range(start, start + count))
            start += count
    for name, ranks in groups.items():
        if global_batch % len(ranks):
            raise InputError("config field 'train.batch_size'", f"gives a global batch of {global_batch}, which "
                             f"student {name}'s {len(ranks)} processes cannot split evenly",
                             "a global batch (train.batch_size x processes) divisible by every group's size")
    return StudentGroups(groups)


def gather_crop_major(x: Tensor, n_crops: int) -> Tensor:
    """Rows [c*B + b] of every rank's `x` as the global batch's rows [c*G + r*B + b] (crop-major)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    stacked = torch.stack([p.view(n_crops, -1, *x.shape[1:]) for p in parts], dim=1)  # [n_c, W, B, ...]
    return stacked.reshape(-1, *x.shape[1:])


def chunk_rows(x: Tensor, n_crops: int, index: int, count: int) -> Tensor:
    """The rows of chunk `index` of `count` of a crop-major global batch [n_c*G, ...]."""
    view = x.view(n_crops, -1, *x.shape[1:])
    size = view.shape[1] // count
    return view[:, index * size:(index + 1) * size].reshape(-1, *x.shape[1:])


def gather_masked(features: Tensor, masks: Tensor, n_crops: int, index: int, count: int) -> tuple[Tensor, Tensor]:
    """Every rank's features at its masked positions (`features` [M_r, D] in the order of
    `masks.nonzero()`), kept for chunk `index` of `count`: (features in the chunk's mask order, the
    number of masked positions in the whole global batch)."""
    world = dist.get_world_size()
    local_b = masks.shape[0] // n_crops
    as_bytes = masks.to(torch.uint8).contiguous()  # not every backend gathers bool tensors
    all_masks = [torch.empty_like(as_bytes) for _ in range(world)]
    dist.all_gather(all_masks, as_bytes)
    all_masks = [m.bool() for m in all_masks]
    counts = [int(m.sum()) for m in all_masks]
    padded = features.new_zeros(max(counts), features.shape[1])
    padded[: features.shape[0]] = features
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    global_b, chunk = local_b * world, local_b * world // count
    keys, rows = [], []
    for r, (m, part, n) in enumerate(zip(all_masks, parts, counts)):
        row, patch = m.nonzero(as_tuple=True)
        sample = r * local_b + row % local_b  # the sample's index in the global batch
        keep = (sample >= index * chunk) & (sample < (index + 1) * chunk)
        keys.append(((row // local_b) * global_b + sample)[keep] * m.shape[1] + patch[keep])
        rows.append(part[:n][keep])
    order = torch.cat(keys).argsort()
    return torch.cat(rows)[order], torch.tensor(float(sum(counts)), device=features.device)
