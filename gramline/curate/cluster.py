"""Step 4b, cluster + balance: hierarchical k-means with resampling, then balanced hierarchical
sampling, after Vo et al. 2024, "Automatic data curation for self-supervised learning" (arXiv
2405.15613).

Reimplemented from the paper's description (the official code, facebookresearch/ssl-data-curation,
is CC-BY-NC, so none of it is used here):
- The tree is built bottom-up: level 1 clusters the points, level t+1 clusters level t's centroids.
- Each level runs k-means (k-means++ init up to 1024 clusters, Lloyd iterations, float64
  centroid sums), then `resampling_steps - 1` times: take the `sample_size` points closest to
  each centroid (or random ones), re-run k-means from a fresh init on that subset only and
  re-assign every point. The subset has equal mass per cluster, so each step moves centroids out
  of dense regions (a warm start from the old centroids would stay put): dense concepts stop
  taking most of the clusters (tests/test_curate_cluster.py measures this).
- Balanced sampling walks the tree top-down: a cluster's budget is split over its children by
  water-filling (the cap x with sum(min(size_i, x)) <= budget is found by binary search; the
  leftover goes +1 to randomly chosen children above the cap), down to level 1, where the budget is
  filled with random points or with the points closest to the centroid.

Assignment uses faiss (exact L2) when installed, else a chunked torch matmul. Deterministic for a
seed on a given machine.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.sparse

from gramline.curate.config import CurateConfig
from gramline.curate.log import log
from gramline.curate.split import Selection
from gramline.curate.workdir import WorkDir, save_npz

Backend = Literal["auto", "faiss", "torch"]


# --------------------------------------------------------------------------- k-means


def _resolve(backend: Backend) -> str:
    if backend != "auto":
        return backend
    try:
        import faiss
    except ImportError:
        return "torch"
    return "faiss"


def assign(x: np.ndarray, centroids: np.ndarray, backend: Backend = "auto",
           chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (squared L2) for every row: (index [n] int64, distance [n] float32)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    if _resolve(backend) == "faiss":
        import faiss

        index = faiss.IndexFlatL2(c.shape[1])
        index.add(c)
        dist, idx = index.search(x, 1)
        return idx[:, 0].astype(np.int64), np.maximum(dist[:, 0], 0.0)
    import torch

    ct = torch.from_numpy(c)
    c_sq = (ct * ct).sum(1)
    out_i, out_d = [], []
    for start in range(0, len(x), chunk):
        xt = torch.from_numpy(x[start:start + chunk])
        d = (xt * xt).sum(1, keepdim=True) - 2 * xt @ ct.T + c_sq
        best, which = d.min(1)
        out_i.append(which.numpy().astype(np.int64))
        out_d.append(best.clamp_min(0).numpy())
    return np.concatenate(out_i), np.concatenate(out_d)


def _centroid_sums(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    onehot = scipy.sparse.csr_matrix((np.ones(len(labels)), (labels, np.arange(len(labels)))), shape=(k, len(labels)))
    return np.asarray(onehot @ x.astype(np.float64)), np.bincount(labels, minlength=k)


KMEANS_PP_MAX_K = 1024
"""k-means++ is sequential over k; above this many clusters, init from distinct random points."""


def _init_centroids(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Greedy k-means++ (2 + ln k candidate draws per centre, the one lowering the potential most
    wins) on at most max(16·k, 8192) points; for k > KMEANS_PP_MAX_K, k distinct random points."""
    rng = np.random.default_rng(seed)
    if k > KMEANS_PP_MAX_K:
        return x[np.sort(rng.choice(len(x), size=k, replace=False))].copy()
    m = max(16 * k, 8192)
    pts = x if len(x) <= m else x[np.sort(rng.choice(len(x), m, replace=False))]
    pts = pts.astype(np.float32)
    sq = (pts * pts).sum(1)
    centers = np.empty((k, pts.shape[1]), np.float32)
    first = int(rng.integers(len(pts)))
    centers[0] = pts[first]
    closest = np.maximum(sq - 2 * pts @ pts[first] + sq[first], 0).astype(np.float64)
    trials = 2 + int(np.log(k))
    for c in range(1, k):
        cum = np.cumsum(closest)
        if cum[-1] <= 0:  # fewer distinct points than k: fill with random points
            centers[c:] = pts[rng.choice(len(pts), size=k - c)]
            break
        cand = np.minimum(np.searchsorted(cum, rng.random(trials) * cum[-1], side="right"), len(pts) - 1)
        dist = np.maximum(sq[None, :] - 2 * pts[cand] @ pts.T + sq[cand][:, None], 0)
        new = np.minimum(closest[None, :], dist)
        best = int(np.argmin(new.sum(1)))
        closest = new[best]
        centers[c] = pts[cand[best]]
    return centers


@dataclass
class KMeansResult:
    centroids: np.ndarray  # [k, d] float32
    labels: np.ndarray     # [n] int64
    distances: np.ndarray  # [n] squared L2 to own centroid


def kmeans(x: np.ndarray, k: int, n_iter: int = 20, seed: int = 0, backend: Backend = "auto",
           n_init: int = 1) -> KMeansResult:
    """Lloyd's k-means; empty clusters are re-seeded with the points farthest from their centroid.

    With `n_init` > 1, the best of that many seeded runs (lowest inertia).
    """
    if n_init > 1:
        runs = [kmeans(x, k, n_iter, seed + 7919 * r, backend) for r in range(n_init)]
        return min(runs, key=lambda run: float(run.distances.astype(np.float64).sum()))
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of points {n}")
    centroids = _init_centroids(x, k, seed).astype(np.float32)
    labels, dist = assign(x, centroids, backend)
    for _ in range(n_iter):
        sums, counts = _centroid_sums(x, labels, k)
        empty = np.flatnonzero(counts == 0)
        new = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        if len(empty):
            far = np.argsort(-dist, kind="stable")[: len(empty)]
            new[empty] = x[far]
        centroids = new
        new_labels, dist = assign(x, centroids, backend)
        changed = int((new_labels != labels).sum())
        labels = new_labels
        if changed == 0 and not len(empty):
            break
    return KMeansResult(centroids=centroids, labels=labels, distances=dist)


def _resample(labels: np.ndarray, dist: np.ndarray, k: int, sample_size: int,
              strategy: Literal["closest", "random"], rng: np.random.Generator) -> np.ndarray:
    """Per cluster, up to `sample_size` member indices (closest to the centroid, or random)."""
    if strategy == "closest":
        order = np.lexsort((dist, labels))
    else:
        order = np.lexsort((rng.random(len(labels)), labels))
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, np.arange(k))
    rank = np.arange(len(order)) - starts[sorted_labels]
    return np.sort(order[rank < sample_size])


# --------------------------------------------------------------------------- hierarchy


@dataclass
class Level:
    centroids: np.ndarray  # [k_l, d]
    labels: np.ndarray     # [n_{l-1}]: cluster of each item of the level below (points for level 1)
    distances: np.ndarray  # [n_{l-1}]


@dataclass
class ClusterTree:
    levels: list[Level] = field(default_factory=list)

    def paths(self) -> np.ndarray:
        """[n_points, L] cluster id of each point at every level (column 0 = level 1)."""
        cols = [self.levels[0].labels]
        for level in self.levels[1:]:
            cols.append(level.labels[cols[-1]])
        return np.stack(cols, axis=1)

    def sizes(self, level: int) -> np.ndarray:
        """Number of points under each cluster of `level` (1-based)."""
        counts = np.bincount(self.levels[0].labels, minlength=len(self.levels[0].centroids))
        for lv in self.levels[1:level]:
            counts = np.bincount(lv.labels, weights=counts, minlength=len(lv.centroids)).astype(np.int64)
        return counts


def auto_levels(n: int, points_per_leaf: int, branching: int, n_levels: int) -> list[int]:
    """Cluster counts lowest→highest: n/points_per_leaf, then divided by `branching` per level."""
    levels = [max(1, round(n / points_per_leaf))]
    for _ in range(n_levels - 1):
        levels.append(max(1, round(levels[-1] / branching)))
    return levels


def hierarchical_kmeans(
    x: np.ndarray,
    levels: Sequence[int],
    n_iter: int = 20,
    resampling_steps: Sequence[int] | int = 1,
    sample_sizes: Sequence[int | None] | None = None,
    resample_strategy: Literal["closest", "random"] = "closest",
    seed: int = 0,
    backend: Backend = "auto",
    log: bool = True,
    n_init: int = 1,
) -> ClusterTree:
    """Bottom-up hierarchical k-means with resampling; `levels` are cluster counts lowest→highest."""
    n_levels = len(levels)
    steps = [resampling_steps] * n_levels if isinstance(resampling_steps, int) else list(resampling_steps)
    sizes = list(sample_sizes) if sample_sizes is not None else [None] * n_levels
    if len(steps) != n_levels or len(sizes) != n_levels:
        raise ValueError("resampling_steps and sample_sizes need one entry per level")
    rng = np.random.default_rng(seed)
    tree = ClusterTree()
    points = np.ascontiguousarray(x, dtype=np.float32)
    for depth, requested in enumerate(levels):
        t0 = time.perf_counter()
        k = int(min(requested, len(points)))
        result = kmeans(points, k, n_iter, seed=seed + depth, backend=backend, n_init=n_init)
        sample_size = sizes[depth] or max(1, round(0.5 * len(points) / k))
        for step in range(max(0, steps[depth] - 1)):
            subset = _resample(result.labels, result.distances, k, sample_size, resample_strategy, rng)
            if len(subset) < k:
                break
            sub = kmeans(points[subset], k, n_iter, seed=seed + depth + 1000 * (step + 1), backend=backend,
                         n_init=n_init)
            labels, dist = assign(points, sub.centroids, backend)
            result = KMeansResult(sub.centroids, labels, dist)
        tree.levels.append(Level(result.centroids, result.labels, result.distances))
        if log:
            counts = np.bincount(result.labels, minlength=k)
            print(f"[curate] k-means level {depth + 1}: {len(points)} items -> {k} clusters "
                  f"(sizes min {counts.min()} median {int(np.median(counts))} max {counts.max()}, "
                  f"{steps[depth]} resampling step(s), {time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        points = result.centroids
    return tree


# --------------------------------------------------------------------------- balanced sampling


def find_cap(sizes: np.ndarray, budget: int) -> int:
    """Largest integer cap with sum(min(sizes, cap)) <= budget (binary search)."""
    lo, hi = 0, int(sizes.max()) if len(sizes) else 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(np.minimum(sizes, mid).sum()) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def water_fill(sizes: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Split `budget` over children of `sizes`: cap big ones, keep small ones whole, spread the rest."""
    sizes = np.asarray(sizes, dtype=np.int64)
    budget = int(min(budget, sizes.sum()))
    cap = find_cap(sizes, budget)
    alloc = np.minimum(sizes, cap)
    leftover = budget - int(alloc.sum())
    if leftover > 0:
        above = np.flatnonzero(sizes > cap)
        alloc[rng.choice(above, size=leftover, replace=False)] += 1
    return alloc


def balanced_sample(tree: ClusterTree, target: int, strategy: Literal["random", "closest"] = "random",
                    seed: int = 0) -> np.ndarray:
    """Indices (sorted) of `target` points sampled down the tree with per-cluster caps."""
    rng = np.random.default_rng(seed)
    n_levels = len(tree.levels)
    sizes = [tree.sizes(level) for level in range(1, n_levels + 1)]
    budgets = water_fill(sizes[-1], target, rng)
    for depth in range(n_levels - 1, 0, -1):  # 0-based: distribute level depth+1's budgets to level depth
        labels = tree.levels[depth].labels  # parent of each level-`depth` cluster
        child_budget = np.zeros(len(labels), np.int64)
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(len(budgets) + 1))
        for parent in np.flatnonzero(budgets):
            children = order[bounds[parent]:bounds[parent + 1]]
            child_budget[children] = water_fill(sizes[depth - 1][children], int(budgets[parent]), rng)
        budgets = child_budget
    leaf = tree.levels[0]
    order = np.lexsort((leaf.distances, leaf.labels)) if strategy == "closest" else np.argsort(leaf.labels, kind="stable")
    bounds = np.searchsorted(leaf.labels[order], np.arange(len(budgets) + 1))
    chosen = []
    for cluster in np.flatnonzero(budgets):
        members = order[bounds[cluster]:bounds[cluster + 1]]
        take = int(budgets[cluster])
        chosen.append(members[:take] if strategy == "closest" else rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def size_summary(counts: np.ndarray) -> dict[str, float]:
    """min / median / p99 / max, largest/smallest ratio and Gini of non-empty cluster sizes."""
    counts = np.sort(np.asarray(counts)[np.asarray(counts) > 0]).astype(np.float64)
    if not len(counts):
        return {"clusters": 0}
    n = len(counts)
    gini = float((2 * np.arange(1, n + 1) - n - 1) @ counts / (n * counts.sum())) if counts.sum() else 0.0
    return {"clusters": n, "min": float(counts[0]), "median": float(np.median(counts)),
            "p99": float(np.percentile(counts, 99)), "max": float(counts[-1]),
            "max_over_min": float(counts[-1] / counts[0]), "gini": round(gini, 4)}


# --------------------------------------------------------------------------- the step


@dataclass
class Balanced:
    pool_rows: np.ndarray   # row of each pool item
    paths: np.ndarray       # [n_pool, L] cluster ids, column 0 = level 1
    selected: np.ndarray    # positions into pool_rows
    levels: list[int]


def cluster_and_balance(cfg: CurateConfig, work: WorkDir, sel: Selection, embeddings: np.ndarray) -> Balanced:
    """Cluster the train pool's embeddings and sample `balance.target` of it (cached in the work dir)."""
    pool_rows = np.flatnonzero(sel.pool_mask)
    cache = work.cluster_cache
    if cache.is_file():
        saved = np.load(cache)
        return Balanced(pool_rows, saved["paths"], saved["selected"], saved["levels"].tolist())
    n = len(pool_rows)
    c = cfg.cluster
    target = round(cfg.balance.target * n) if cfg.balance.target <= 1 else min(int(cfg.balance.target), n)
    if n < 2:
        paths, selected, levels = np.zeros((n, 1), np.int64), np.arange(n), [n]
    else:
        levels = list(c.levels) or auto_levels(n, c.points_per_leaf, c.branching, c.n_levels)
        steps = c.resampling_steps * len(levels) if len(c.resampling_steps) == 1 else list(c.resampling_steps)
        t0 = time.perf_counter()
        tree = hierarchical_kmeans(embeddings, levels, c.n_iter, steps, list(c.sample_sizes) or None,
                                   c.resample_strategy, cfg.seed, c.backend, n_init=c.n_init)
        paths = tree.paths()
        selected = balanced_sample(tree, target, cfg.balance.strategy, cfg.seed)
        log(f"clustering: levels {levels} in {time.perf_counter() - t0:.1f} s; balanced sampling kept "
            f"{len(selected)}/{n} (target {target})")
    save_npz(cache, paths=paths, selected=selected, levels=np.asarray(levels))
    return Balanced(pool_rows, paths, selected, levels)
