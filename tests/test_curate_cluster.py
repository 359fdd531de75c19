"""Hierarchical k-means with resampling and balanced hierarchical sampling (Vo et al. 2024)."""

from __future__ import annotations

import numpy as np
import pytest

from gramline.config import load_stage_config
from gramline.curate import cluster
from gramline.curate.cluster import (
    CentroidGroups,
    assign,
    auto_levels,
    balanced_sample,
    build_tree,
    find_cap,
    hierarchical_kmeans,
    kmeans,
    size_summary,
    split_kmeans,
    water_fill,
)
from gramline.curate.config import CurateConfig
from gramline.errors import InputError

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


# split k-means in groups of 8 clusters at every level: the approximate method on a small collection
APPROXIMATE = {"method": "approximate", "clusters_per_group": 8, "nprobe": 2}


@pytest.mark.parametrize("method", ["exact", "approximate"])
@pytest.mark.parametrize("strategy", ["random", "closest"])
def test_balanced_sampling_flattens_a_skewed_collection(strategy: str, method: str) -> None:
    x, truth = _blobs()
    options = APPROXIMATE if method == "approximate" else {"method": "exact"}
    tree = hierarchical_kmeans(x, [56, 9], n_iter=20, resampling_steps=[1, 5], seed=0, log=False, **options)
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


@pytest.mark.parametrize("method", ["exact", "approximate"])
def test_resampling_moves_centroids_away_from_the_dense_concept(method: str) -> None:
    """Plain k-means puts most centroids into dense regions; resampling spreads them (Vo et al.)."""
    x, truth = _blobs(seed=1)
    options = APPROXIMATE if method == "approximate" else {"method": "exact"}
    plain = hierarchical_kmeans(x, [24], n_iter=30, resampling_steps=1, seed=0, log=False, **options)
    resampled = hierarchical_kmeans(x, [24], n_iter=30, resampling_steps=10, seed=0, log=False, **options)

    def clusters_in_largest(tree) -> int:
        labels = tree.levels[0].labels
        return sum(1 for c in np.unique(labels) if np.bincount(truth[labels == c]).argmax() == 0)

    assert clusters_in_largest(resampled) < clusters_in_largest(plain)


def test_size_summary() -> None:
    s = size_summary(np.array([10, 0, 30, 20]))
    assert s["clusters"] == 3 and s["min"] == 10 and s["max"] == 30 and s["max_over_min"] == 3
    assert s["gini"] == pytest.approx((2 * (1 * 10 + 2 * 20 + 3 * 30) - 4 * 60) / (3 * 60), abs=1e-4)


def _regions(seed: int = 0, dim: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """20 regions ~40 apart (at least 15), 5 centroids in each within
    ~4 of the region centre, 30 points within ~0.4 of each centroid: (points, centroids, region of
    each centroid, region centres). A point's nearest region centre (~4 away) is its own region's
    (~40 to the others), and its nearest centroid (~0.4 away, the others >= ~5) is its own."""
    rng = np.random.default_rng(seed)
    regions = rng.normal(size=(20, dim)) * 40 / np.sqrt(2 * dim)
    assert min(np.linalg.norm(a - b) for i, a in enumerate(regions) for b in regions[:i]) > 15  # none close by chance
    of = np.repeat(np.arange(20), 5)
    centroids = regions[of] + rng.normal(size=(100, dim)) * 4 / np.sqrt(dim)
    points = np.repeat(centroids, 30, axis=0) + rng.normal(size=(3000, dim)) * 0.4 / np.sqrt(dim)
    return points.astype(np.float32), centroids.astype(np.float32), of, regions.astype(np.float32)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_approximate_assignment_agrees_with_exact_on_separated_regions(backend: str) -> None:
    points, centroids, of, regions = _regions()
    exact_i, exact_d = assign(points, centroids, backend)
    assert np.array_equal(exact_i, np.repeat(np.arange(100), 30))  # as constructed
    approx_i, approx_d = assign(points, centroids, backend, CentroidGroups(regions, of), nprobe=1)
    assert (approx_i == exact_i).mean() >= 0.99
    assert np.allclose(approx_d, exact_d, rtol=1e-3, atol=1e-3)
    # with every group probed the search is exhaustive: exact
    all_i, _ = assign(points, centroids, backend, CentroidGroups(regions, of), nprobe=20)
    assert np.array_equal(all_i, exact_i)


def test_approximate_assignment_probes_only_the_nearest_groups() -> None:
    """A point is compared with the centroids of its `nprobe` nearest groups only: with the groups
    deliberately mislabelled (every centroid in the group of the next region), nprobe=1 finds the
    nearest centroid of the wrong (probed) group, not the true nearest one."""
    points, centroids, of, regions = _regions()
    wrong = CentroidGroups(regions, (of + 1) % 20)
    approx_i, _ = assign(points, centroids, "faiss", wrong, nprobe=1)
    assert np.array_equal((of[approx_i] + 1) % 20, of[np.repeat(np.arange(100), 30)])


def test_approximate_assignment_in_row_blocks_gives_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """A group's probing points are searched in blocks of rows (bounded memory); the blocks change
    nothing: every group here is probed by ~300 points, searched in blocks of 7."""
    points, centroids, of, regions = _regions()
    groups = CentroidGroups(regions, of)
    whole_i, whole_d = assign(points, centroids, "faiss", groups, nprobe=2)
    monkeypatch.setattr(cluster, "ROWS_PER_TASK", 7)
    blocked_i, blocked_d = assign(points, centroids, "faiss", groups, nprobe=2)
    assert np.array_equal(blocked_i, whole_i) and np.allclose(blocked_d, whole_d)
    exact_i, _ = assign(points, centroids, "faiss")
    assert (blocked_i == exact_i).mean() >= 0.99


def test_split_kmeans_finds_separated_concepts() -> None:
    points, _, _, _ = _regions(seed=2)
    truth = np.repeat(np.arange(100), 30)
    result = split_kmeans(points, 100, n_groups=10, n_iter=30, seed=0, nprobe=2)
    assert result.groups is not None and len(result.centroids) == 100
    sizes = np.bincount(result.labels, minlength=100)
    assert sizes.sum() == len(points)
    # clusters never mix two of the 100 blobs, and nearly all blobs are found whole
    for c in np.unique(result.labels):
        assert len(np.unique(truth[result.labels == c])) == 1
    assert (sizes == 30).mean() >= 0.9
    exact_i, _ = assign(points, result.centroids)
    assert (result.labels == exact_i).mean() >= 0.99


def test_kmeans_on_a_sample_assigns_every_point() -> None:
    x, truth = _blobs()
    result = kmeans(x, 12, n_iter=30, seed=0, sample_per_centroid=8)  # Lloyd on 96 of 1122 points
    labels, dist = assign(x, result.centroids)
    assert np.array_equal(result.labels, labels) and np.allclose(result.distances, dist)
    # 96 points from 1122 miss the 12-point concept with probability (1 - 12/1122)^96 ~ 0.36, so only
    # the five larger concepts (>= 30 points each: missed with probability < 0.08) are checked
    for concept in range(5):
        owners = np.unique(result.labels[truth == concept])
        assert all(np.bincount(truth[result.labels == c]).argmax() == concept for c in owners)


def test_approximate_hierarchy_is_deterministic_for_a_seed() -> None:
    x, _ = _blobs()
    runs = [hierarchical_kmeans(x, [56, 9], n_iter=20, resampling_steps=[1, 5], seed=s, log=False, **APPROXIMATE)
            for s in (4, 4, 5)]
    assert np.array_equal(runs[0].paths(), runs[1].paths())
    assert np.array_equal(balanced_sample(runs[0], 200, seed=1), balanced_sample(runs[1], 200, seed=1))
    assert not np.array_equal(runs[0].paths(), runs[2].paths())


def test_build_tree_follows_the_cluster_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cluster.method` auto: split k-means at the levels with >= approximate_min_clusters clusters."""
    x, _ = _blobs()
    calls: list[int] = []
    real = cluster.split_kmeans

    def spy(*args, **kwargs):
        calls.append(kwargs["k"] if "k" in kwargs else args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(cluster, "split_kmeans", spy)
    cfg = load_stage_config(CurateConfig, "curate", "tiny",
                            overrides=["cluster.levels=[56,9]", "cluster.approximate_min_clusters=50"])
    tree, levels = build_tree(cfg.cluster, x, seed=0)
    assert levels == [56, 9] and tree.sizes(2).sum() == len(x)
    assert set(calls) == {56}  # level 1 (and its resampling fits, if any), not level 2
    calls.clear()
    exact = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"method": "exact"})})
    build_tree(exact.cluster, x, seed=0)
    assert calls == []


@pytest.mark.parametrize("override", ["cluster.method=fast", "cluster.nprobe=0", "cluster.clusters_per_group=0",
                                      "cluster.sample_per_centroid=2", "cluster.approximate_min_clusters=0"])
def test_bad_scale_settings_are_rejected(override: str) -> None:
    with pytest.raises(InputError, match=override.split("=")[0].replace(".", r"\.")):
        load_stage_config(CurateConfig, "curate", "tiny", overrides=[override])
