"""iBOT block masks and per-batch mask sampling (official `dinov3/data/masking.py`)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from gramline.data.masking import BlockMaskGenerator, sample_batch_masks
from gramline.errors import InputError


@pytest.mark.parametrize("grid", [(6, 6), (14, 14), (16, 16), (7, 10)])
def test_block_masks_have_exactly_the_requested_count(grid: tuple[int, int]) -> None:
    generator = BlockMaskGenerator(grid)
    rng = np.random.default_rng(0)
    n = grid[0] * grid[1]
    for count in list(range(n // 2 + 1)) + [n - 1, n]:
        mask = generator(count, rng)
        assert mask.shape == grid and mask.dtype == bool
        assert int(mask.sum()) == count


def components(mask: np.ndarray) -> int:
    return int(ndimage.label(mask)[1])  # 4-connected components


def test_block_masks_are_blocks_not_scattered_patches() -> None:
    grid, rng = (14, 14), np.random.default_rng(1)
    generator = BlockMaskGenerator(grid)
    block, scattered, largest = [], [], []
    for count in (20, 40, 60, 80, 98):
        for _ in range(20):
            mask = generator(count, rng)
            labels, n = ndimage.label(mask)
            block.append(n)
            largest.append(np.bincount(labels.ravel())[1:].max() / count)
            random_mask = np.zeros(196, bool)
            random_mask[rng.choice(196, count, replace=False)] = True
            scattered.append(components(random_mask.reshape(grid)))
    # measured: ~2-3 components for blocks against ~17-27 for random patches of the same count
    assert np.mean(block) < 0.3 * np.mean(scattered)
    assert np.mean(largest) > 0.5  # most masked patches sit in one block


def test_a_single_block_is_a_rectangle_within_the_aspect_range() -> None:
    generator = BlockMaskGenerator((14, 14))
    rng = np.random.default_rng(2)
    for _ in range(100):
        mask = np.zeros((14, 14), bool)
        added = generator._add_block(mask, 98, rng)
        if added == 0:
            continue
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        h, w = rows.size, cols.size
        assert added == h * w == int(mask.sum())  # a full rectangle
        assert 4 <= h * w <= 98 + 0.5 * (h + w)  # area in [min, max] up to rounding of the sides
        assert h < 14 and w < 14


def test_masks_are_deterministic_given_the_generator_seed() -> None:
    a = sample_batch_masks(16, (14, 14), rng=np.random.default_rng(3))
    b = sample_batch_masks(16, (14, 14), rng=np.random.default_rng(3))
    c = sample_batch_masks(16, (14, 14), rng=np.random.default_rng(4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_batch_masks_stratified_ratios_half_masked_shuffled() -> None:
    n_crops, grid, n = 64, (14, 14), 196
    masks = sample_batch_masks(n_crops, grid, rng=np.random.default_rng(5))
    assert masks.shape == (n_crops, n) and masks.dtype == bool
    counts = masks.sum(1)
    masked = counts[counts > 0]
    assert masked.size == 32  # int(64 * 0.5)
    # the i-th of 32 masked crops gets ratio 0.1 + 0.4 * (i + 1) / 32: 0.1125, 0.125, ..., 0.5
    expected = [int(n * (0.1 + 0.4 * (i + 1) / 32) + 1e-9) for i in range(32)]
    assert sorted(masked.tolist()) == expected
    assert all(0.1 * n < c <= 0.5 * n for c in masked)
    masked_rows = np.flatnonzero(counts > 0)
    assert not np.array_equal(masked_rows, np.arange(32))  # shuffled, not the first half
    assert 8 <= np.sum(masked_rows < 32) <= 24


def test_batch_masks_probability_and_ratio_settings() -> None:
    rng = np.random.default_rng(6)
    assert sample_batch_masks(8, (6, 6), sample_probability=0.0, rng=rng).sum() == 0
    all_masked = sample_batch_masks(8, (6, 6), sample_probability=1.0, rng=rng)
    assert bool(all_masked.any(1).all())
    odd = sample_batch_masks(5, (6, 6), rng=rng)  # int(5 * 0.5) = 2 crops, ratios 0.3 and 0.5
    assert sorted(odd.sum(1).tolist()) == [0, 0, 0, int(36 * 0.3), 18]
    fixed = sample_batch_masks(4, (10, 10), sample_probability=1.0, min_ratio=0.2, max_ratio=0.2, rng=rng)
    assert fixed.sum(1).tolist() == [20, 20, 20, 20]


def test_bad_requests_raise_input_error() -> None:
    generator = BlockMaskGenerator((4, 4))
    with pytest.raises(InputError, match="num_masked"):
        generator(17, np.random.default_rng(0))
    with pytest.raises(InputError, match="num_masked"):
        generator(-1, np.random.default_rng(0))
    with pytest.raises(InputError, match="grid"):
        BlockMaskGenerator((0, 4))
