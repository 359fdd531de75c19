"""iBOT mask sampling as in the DINOv3 recipe (arXiv 2508.10104): BEiT-style block masks with an
exact patch count (`MaskingGenerator` in facebookresearch/dinov3, `dinov3/data/masking.py`), and the
stratified per-batch assignment of mask ratios to half the global crops (`collate_data_and_cast` in
`dinov3/data/collate.py`).

All randomness comes from the numpy Generator passed in, never from global state.
"""

from __future__ import annotations

import math

import numpy as np

from gramline.errors import InputError


class BlockMaskGenerator:
    """Masks of exactly `num_masked` patches on a `grid` = (height, width) patch grid, built from
    rectangular blocks (area uniform in [min_num_patches, max_num_patches], aspect ratio
    log-uniform in [min_aspect, 1/min_aspect], up to `max_attempts` tries per block); whatever
    the blocks leave short is filled with random unmasked patches."""

    def __init__(self, grid: tuple[int, int], max_num_patches: int | None = None, min_num_patches: int = 4,
                 min_aspect: float = 0.3, max_attempts: int = 10) -> None:
        height, width = grid
        if height < 1 or width < 1:
            raise InputError("mask grid", f"is {height}x{width}", "at least 1x1 patches")
        if not 0 < min_aspect <= 1:
            raise InputError("min_aspect", f"is {min_aspect}", "0 < min_aspect <= 1")
        self.height, self.width = height, width
        self.num_patches = height * width
        self.max_num_patches = int(0.5 * self.num_patches) if max_num_patches is None else max_num_patches
        self.min_num_patches = min_num_patches
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
        self.max_attempts = max_attempts

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Try to mask one block that adds between 1 and `budget` new patches; return how many."""
        for _ in range(self.max_attempts):
            lo, hi = sorted((self.min_num_patches, budget))
            area = rng.uniform(lo, hi)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if not (0 < h < self.height and 0 < w < self.width):
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            block = mask[top:top + h, left:left + w]
            new = h * w - int(block.sum())
            if 0 < new <= budget:
                block[...] = True
                return new
        return 0

    def __call__(self, num_masked: int, rng: np.random.Generator) -> np.ndarray:
        if not 0 <= num_masked <= self.num_patches:
            raise InputError("num_masked", f"is {num_masked}", f"between 0 and {self.num_patches} patches")
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masked:
            added = self._add_block(mask, min(num_masked - count, self.max_num_patches), rng)
            if added == 0:
                break
            count += added
        if count < num_masked:
            free = np.flatnonzero(~mask)
            mask.flat[rng.choice(free, size=num_masked - count, replace=False)] = True
        return mask


def mask_ratios(n_masked: int, min_ratio: float, max_ratio: float) -> np.ndarray:
    """Stratified ratios: the i-th masked crop gets linspace(min, max, n_masked + 1)[i + 1]."""
    return np.linspace(min_ratio, max_ratio, n_masked + 1)[1:]


def sample_batch_masks(n_crops: int, grid: tuple[int, int], sample_probability: float = 0.5,
                       min_ratio: float = 0.1, max_ratio: float = 0.5, *,
                       rng: np.random.Generator) -> np.ndarray:
    """Masks [n_crops, N] for a batch of global crops: int(n_crops * p) crops get a block mask
    with stratified ratios in (min_ratio, max_ratio], in shuffled order; the others none."""
    generator = BlockMaskGenerator(grid)
    n_masked = int(n_crops * sample_probability)
    masks = np.zeros((n_crops, generator.num_patches), dtype=bool)
    for i, ratio in enumerate(mask_ratios(n_masked, min_ratio, max_ratio)):
        masks[i] = generator(int(generator.num_patches * ratio), rng).reshape(-1)
    return masks[rng.permutation(n_crops)]
