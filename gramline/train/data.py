"""The training batch source: a rank's shard stream → per-sample multi-crop → collated CropBatch.

Every random choice is a pure function of (seed, rank, sample position): the augmentation of the
sample at position p uses seed (seed, rank, p); the masks of the batch at step s use (seed, rank,
s). So `batches(start_step)` started at step s yields exactly the batches an uninterrupted run
would have seen from step s on, whatever the number of DataLoader workers. (With global batches
the rank in those seeds is 0 and positions and steps are the global ones.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from gramline.data.augment import CropSet, MultiCropAugment
from gramline.data.collate import CropBatch, collate_crops
from gramline.data.config import MaskingConfig
from gramline.data.reader import DatasetInfo
from gramline.train.config import CropTrainingConfig
from gramline.train.distributed import DistEnv


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@dataclass
class AugmentSample:
    """Stream transform: sample dict → (position, CropSet). One of `augments` per step, picked by
    `choose(step)` (all ranks agree: the step number is the same everywhere)."""

    augments: Sequence[MultiCropAugment]
    seed: int
    rank: int
    batch_size: int
    choose: Callable[[int], int] | None = None

    def __call__(self, sample: dict) -> tuple[int, CropSet]:
        position = int(sample["index"])
        step = position // self.batch_size
        which = self.choose(step) if self.choose is not None else 0
        crops = self.augments[which](sample["image"], seed=derive_seed(self.seed, self.rank, position))
        return position, crops


@dataclass
class CollateBatch:
    """Stack a batch and sample its iBOT masks. With `global_slice=(r, n)` the batch is the r-th of n
    slices of a global batch: the masks are sampled for the whole global batch (from the step's
    seed) and the slice's rows kept, so the masks do not depend on how the batch is split."""

    patch_size: int
    masking: MaskingConfig
    seed: int
    rank: int
    global_slice: tuple[int, int] | None = None

    def __call__(self, items: list[tuple[int, CropSet]]) -> CropBatch:
        crops = [crops for _, crops in items]
        if self.global_slice is None:
            step = items[0][0] // len(items)
            return collate_crops(crops, self.patch_size, self.masking, derive_seed(self.seed, self.rank, step, 7))
        index, count = self.global_slice
        size = len(items)
        step = items[0][0] // (size * count)
        batch = collate_crops(crops, self.patch_size, self.masking, derive_seed(self.seed, 0, step, 7),
                              mask_batch_size=size * count)
        n_global = batch.global_crops.shape[0] // size
        rows = torch.cat([torch.arange(c * size * count + index * size, c * size * count + (index + 1) * size)
                          for c in range(n_global)])
        return replace(batch, masks=batch.masks[rows])


def batch_source(info: DatasetInfo, config: CropTrainingConfig, env: DistEnv,
                 augments: Sequence[MultiCropAugment] | None = None, choose: Callable[[int], int] | None = None,
                 global_batches: bool = False) -> Callable[[int], Iterator[CropBatch]]:
    """`batches(start_step)`: this rank's CropBatches of `train.batch_size` images from that step on.

    By default each rank reads its own share of the dataset (seeds depend on the rank). With
    `global_batches`, step s's global batch (`train.batch_size` x ranks images) is the same whatever
    the number of ranks, and rank r gets its r-th slice: every rank reads the one global sequence,
    decoding only its slice, and augmentation and masks are seeded by global position and step."""
    batch_size = config.train.batch_size
    seed = config.train.seed
    patch_size = config.patch_size
    augments = [a.on_device(env.device) for a in (augments or [MultiCropAugment(config.crops)])]
    info.shard_counts("train")  # fails early, naming the dataset, when the train split is empty
    if global_batches:
        reader_rank, readers, share, step_size = 0, 1, (env.rank, env.world_size), batch_size * env.world_size
        collate = CollateBatch(patch_size, config.masking, seed, 0, (env.rank, env.world_size))
    else:
        reader_rank, readers, share, step_size = env.rank, env.world_size, (0, 1), batch_size
        collate = CollateBatch(patch_size, config.masking, seed, env.rank)

    def batches(start_step: int) -> Iterator[CropBatch]:
        stream = info.stream(
            "train", seed=seed, mode=config.data.sampling, rank=reader_rank, world_size=readers,
            shuffle_buffer=config.data.shuffle_buffer, batch_size=batch_size,
            start_position=start_step * step_size, share=share,
            transform=AugmentSample(augments, seed, reader_rank, step_size, choose),
            decode_images=False,  # the augmentation decodes a JPEG only at the size its crops need
        )
        workers = config.data.num_workers
        loader = DataLoader(
            stream, batch_size=batch_size, num_workers=workers, collate_fn=collate,
            pin_memory=env.device.type == "cuda", prefetch_factor=4 if workers else None,
            persistent_workers=False,
            # its own generator: creating the loader must not draw from the global RNG, whose state
            # a resumed run restores from the checkpoint (RoPE rescale and drop-path draw from it)
            generator=torch.Generator().manual_seed(derive_seed(seed, env.rank, start_step)),
        )
        return iter(loader)

    return batches
