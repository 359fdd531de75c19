"""The training batch source: a rank's shard stream → per-sample multi-crop → collated CropBatch.

Every random choice is a pure function of (seed, rank, sample position): the augmentation of the
sample at position p uses seed (seed, rank, p); the masks of the batch at step s use (seed, rank,
s). So `batches(start_step)` started at step s yields exactly the batches an uninterrupted run
would have seen from step s on, whatever the number of DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from gramline.data.augment import CropSet, MultiCropAugment
from gramline.data.collate import CropBatch, collate_crops
from gramline.data.config import MaskingConfig
from gramline.data.reader import DatasetInfo
from gramline.models.archs import ARCHS
from gramline.train.distributed import DistEnv
from gramline.train.recipes.dino.config import DinoConfig


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
    patch_size: int
    masking: MaskingConfig
    seed: int
    rank: int

    def __call__(self, items: list[tuple[int, CropSet]]) -> CropBatch:
        step = items[0][0] // len(items)
        seed = derive_seed(self.seed, self.rank, step, 7)
        return collate_crops([crops for _, crops in items], self.patch_size, self.masking, seed)


def batch_source(info: DatasetInfo, config: DinoConfig, env: DistEnv,
                 augments: Sequence[MultiCropAugment] | None = None,
                 choose: Callable[[int], int] | None = None) -> Callable[[int], Iterator[CropBatch]]:
    batch_size = config.train.batch_size
    seed = config.train.seed
    patch_size = ARCHS[config.backbone.arch].patch_size
    augments = list(augments) if augments is not None else [MultiCropAugment(config.crops)]
    info.shard_counts("train")  # fails early, naming the dataset, when the train split is empty

    def batches(start_step: int) -> Iterator[CropBatch]:
        stream = info.stream(
            "train", seed=seed, mode=config.data.sampling, rank=env.rank, world_size=env.world_size,
            shuffle_buffer=config.data.shuffle_buffer, batch_size=batch_size,
            start_position=start_step * batch_size,
            transform=AugmentSample(augments, seed, env.rank, batch_size, choose),
        )
        workers = config.data.num_workers
        loader = DataLoader(
            stream, batch_size=batch_size, num_workers=workers,
            collate_fn=CollateBatch(patch_size, config.masking, seed, env.rank),
            pin_memory=env.device.type == "cuda", prefetch_factor=4 if workers else None,
            persistent_workers=False,
            # its own generator: creating the loader must not draw from the global RNG, whose state
            # a resumed run restores from the checkpoint (RoPE rescale and drop-path draw from it)
            generator=torch.Generator().manual_seed(derive_seed(seed, env.rank, start_step)),
        )
        return iter(loader)

    return batches
