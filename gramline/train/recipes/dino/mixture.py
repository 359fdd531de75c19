"""The highres stage's resolution mixture: one (global, local, Gram) crop-size set per step, drawn with
the sets' weights (official `high_res_adapt` config; DINOv3 paper §4.3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gramline.data.augment import MultiCropAugment
from gramline.train.recipes.dino.config import HighresStageConfig


@dataclass(frozen=True)
class MixtureChoice:
    """Which resolution set step s uses: a draw with the sets' weights from a generator seeded by
    (seed, s), so every rank and every resume agrees without communication."""

    weights: tuple[float, ...]
    seed: int

    def __call__(self, step: int) -> int:
        p = np.asarray(self.weights, dtype=np.float64)
        rng = np.random.default_rng([self.seed, int(step)])
        return int(rng.choice(len(p), p=p / p.sum()))


def mixture_augments(config: HighresStageConfig) -> list[MultiCropAugment]:
    """One multi-crop augmentation per resolution set (the rest of `crops` is shared)."""
    augments = []
    for i, res in enumerate(config.phase.resolutions):
        crops = config.crops.model_copy(update={"global_size": res.global_size, "local_size": res.local_size,
                                                "gram_size": config.gram_size_of(i)})
        augments.append(MultiCropAugment(crops))
    return augments


def mixture_choice(config: HighresStageConfig) -> MixtureChoice:
    return MixtureChoice(tuple(r.weight for r in config.phase.resolutions), config.phase.mixture_seed)


def resolution_counts(choice: MixtureChoice, steps: Sequence[int]) -> list[int]:
    counts = [0] * len(choice.weights)
    for step in steps:
        counts[choice(step)] += 1
    return counts
