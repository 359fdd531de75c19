"""Hierarchical k-means with resampling and balanced hierarchical sampling (Vo et al. 2024)."""

from __future__ import annotations

import numpy as np
import pytest

from gramline.curate.cluster import (
    auto_levels,
    balanced_sample,
    find_cap,
    hierarchical_kmeans,
    kmeans,
    size_summary,
    water_fill,
)

SIZES = [600, 300, 120, 60, 30, 12]  # a skewed collection: largest/smallest concept = 50


def _blobs(seed: int = 0, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(SIZES), dim)) * 4
    x = np.concatenate([c + rng.normal(size=(n, dim)) for c, n in zip(centers, SIZES)]).astype(np.float32)
    return x, np.repeat(np.arange(len(SIZES)), SIZES)


def test_find_cap_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 50, int(rng.integers(1, 12)))
        budget = int(rng.integers(0, sizes.sum() + 5))
        brute = max(c for c in range(60) if np.minimum(sizes, c).sum() <= budget)
        assert find_cap(sizes, budget) == min(brute, sizes.max())


def test_water_fill_keeps_small_clusters_whole_and_caps_big_ones() -> None:
    rng = np.random.default_rng(0)
    alloc = water_fill(np.array([100, 3, 40, 7, 100]), 60, rng)
    assert alloc.sum() == 60
    assert alloc[1] == 3 and alloc[3] == 7          # small clusters whole
    # 50 left for the three big ones: cap 16, the 2 left over go +1 to two of them
    assert sorted(alloc[[0, 2, 4]].tolist()) == [16, 17, 17]
    assert water_fill(np.array([5, 5]), 100, rng).tolist() == [5, 5]  # budget above the total


def test_kmeans_clusters_do_not_straddle_separated_blobs() -> None:
    x, truth = _blobs()
    k = 2 * len(SIZES)
    result = kmeans(x, k, n_iter=30, seed=0)
    assert np.bincount(result.labels, minlength=k).min() >= 1
    for c in range(k):  # every cluster is pure
        assert len(np.unique(truth[result.labels == c])) == 1
    # and Lloyd's iterations left each point at its nearest centroid
    d = ((x[:, None, :] - result.centroids[None]) ** 2).sum(-1)
    assert np.array_equal(d.argmin(1), result.labels)


def test_hierarchy_is_consistent_and_deterministic() -> None:
    x, _ = _blobs()
    levels = auto_levels(len(x), points_per_leaf=20, branching=6, n_levels=2)
    assert levels == [56, 9]
    tree = hierarchical_kmeans(x, levels, n_iter=20, resampling_steps=[1, 5], seed=3, log=False)
    paths = tree.paths()
    assert paths.shape == (len(x), 2)
    # a level-2 id is a function of the level-1 id (bottom-up tree)
    assert np.array_equal(paths[:, 1], tree.levels[1].labels[paths[:, 0]])
    assert tree.sizes(1).sum() == tree.sizes(2).sum() == len(x)
    again = hierarchical_kmeans(x, levels, n_iter=20, resampling_steps=[1, 5], seed=3, log=False)
    assert np.array_equal(again.paths(), paths)
    assert np.array_equal(balanced_sample(tree, 200, seed=1), balanced_sample(again, 200, seed=1))


@pytest.mark.parametrize("strategy", ["random", "closest"])
def test_balanced_sampling_flattens_a_skewed_collection(strategy: str) -> None:
    x, truth = _blobs()
    tree = hierarchical_kmeans(x, [56, 9], n_iter=20, resampling_steps=[1, 5], seed=0, log=False)
    chosen = balanced_sample(tree, 240, strategy=strategy, seed=0)
    assert len(chosen) == 240 and len(np.unique(chosen)) == 240
    before = np.bincount(truth, minlength=len(SIZES))
    after = np.bincount(truth[chosen], minlength=len(SIZES))
    ratio_before = before.max() / before.min()
    ratio_after = after.max() / max(after.min(), 1)
    assert ratio_before / ratio_after >= 5, (before, after)
    assert after[-1] == SIZES[-1]  # the rarest concept is kept whole
    if strategy == "closest":  # leaves give their points nearest the centroid
        leaf = tree.levels[0]
        for cluster in np.unique(leaf.labels[chosen]):
            members = np.flatnonzero(leaf.labels == cluster)
            picked = np.intersect1d(members, chosen)
            rest = np.setdiff1d(members, chosen)
            if len(rest):
                assert leaf.distances[picked].max() <= leaf.distances[rest].min()


def test_resampling_moves_centroids_away_from_the_dense_concept() -> None:
    """Plain k-means puts most centroids into dense regions; resampling spreads them (Vo et al.)."""
    x, truth = _blobs(seed=1)
    plain = hierarchical_kmeans(x, [24], n_iter=30, resampling_steps=1, seed=0, log=False)
    resampled = hierarchical_kmeans(x, [24], n_iter=30, resampling_steps=10, seed=0, log=False)

    def clusters_in_largest(tree) -> int:
        labels = tree.levels[0].labels
        return sum(1 for c in np.unique(labels) if np.bincount(truth[labels == c]).argmax() == 0)

    assert clusters_in_largest(resampled) < clusters_in_largest(plain)


def test_size_summary() -> None:
    s = size_summary(np.array([10, 0, 30, 20]))
    assert s["clusters"] == 3 and s["min"] == 10 and s["max"] == 30 and s["max_over_min"] == 3
    assert s["gini"] == pytest.approx((2 * (1 * 10 + 2 * 20 + 3 * 30) - 4 * 60) / (3 * 60), abs=1e-4)
