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

- At scale (docs/curate.md, "Clustering at scale"), a level with many clusters runs `split_kmeans`
  instead: seeded like the exact k-means, a coarse k-means splits the points into groups, Lloyd's
  iterations run inside each group, and the final assignment searches the nearest `nprobe` groups
  (`assign` with `CentroidGroups`): about n·k/groups distances per iteration instead of n·k.

Distances use faiss (exact L2) when installed, else a chunked torch matmul; on a CUDA GPU, torch
there. Deterministic for a seed on a given machine (threads split the work into fixed blocks).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import numpy as np
import scipy.sparse
from threadpoolctl import threadpool_limits

from gramline.curate.config import ClusterConfig, CurateConfig
from gramline.curate.log import log
from gramline.curate.split import Selection
from gramline.curate.workdir import WorkDir, save_npz

Backend = Literal["auto", "faiss", "torch"]
Method = Literal["auto", "exact", "approximate"]
Init = Literal["k-means++", "random"]
_T = TypeVar("_T")


# --------------------------------------------------------------------------- nearest centroids


def _resolve(backend: Backend) -> str:
    """For "auto": torch when a CUDA GPU is there, else faiss (torch if faiss is not installed)."""
    if backend != "auto":
        return backend
    if gpu_available():
        return "torch"
    try:
        import faiss  # noqa: F401
    except ImportError:
        return "torch"
    return "faiss"


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


ROWS_PER_TASK = 16384
"""faiss searches are split into blocks of rows run on one thread per core, each single-threaded:
on a busy shared machine the barriers of a multi-threaded BLAS or OpenMP loop cost several times
the work of small products (measured: 7x the CPU time for k-means++ on 2500 x 384 with two
OpenBLAS threads); the result does not depend on the thread count."""


def _threaded(fn: Callable[[int], _T], items: Sequence[int]) -> list[_T]:
    """`fn` over `items` on one thread per core, with BLAS and faiss single-threaded in each."""
    def call(item: int) -> _T:
        try:
            import faiss

            faiss.omp_set_num_threads(1)  # per thread (an OpenMP setting of the calling thread)
        except ImportError:
            pass
        return fn(item)

    if len(items) <= 1:
        return [call(item) for item in items]
    with threadpool_limits(limits=1, user_api="blas"), \
            concurrent.futures.ThreadPoolExecutor(min(len(items), os.cpu_count() or 1)) as pool:
        return list(pool.map(call, items))


def _search(x: np.ndarray, c: np.ndarray, backend: Backend, topk: int = 1,
            threaded: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The `topk` nearest rows of `c` (squared L2) for every row of `x`: ([n, topk] int64, [n, topk] float32)."""
    if _resolve(backend) == "faiss":
        import faiss

        index = faiss.IndexFlatL2(c.shape[1])
        index.add(c)
        if threaded:
            parts = _threaded(lambda s: index.search(x[s:s + ROWS_PER_TASK], topk), range(0, len(x), ROWS_PER_TASK))
            dist, idx = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        else:
            dist, idx = index.search(x, topk)
        return idx.astype(np.int64), np.maximum(dist, 0.0)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ct = torch.from_numpy(c).to(device)
    c_sq = (ct * ct).sum(1)
    chunk = max(256, 2**26 // len(c))  # a distance block of at most 64M floats
    out_i, out_d = [], []
    for start in range(0, len(x), chunk):
        xt = torch.from_numpy(x[start:start + chunk]).to(device)
        d = (xt * xt).sum(1, keepdim=True) - 2 * xt @ ct.T + c_sq
        best, which = d.topk(topk, dim=1, largest=False)
        out_i.append(which.cpu().numpy().astype(np.int64))
        out_d.append(best.clamp_min(0).cpu().numpy())
    return np.concatenate(out_i), np.concatenate(out_d)


@dataclass
class CentroidGroups:
    """Centroids grouped for approximate search: every centroid belongs to one group."""

    centres: np.ndarray   # [g, d] a point's probed groups are the `nprobe` with the nearest centres
    of: np.ndarray        # [k] group of each centroid


def assign(x: np.ndarray, centroids: np.ndarray, backend: Backend = "auto", groups: CentroidGroups | None = None,
           nprobe: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (squared L2) for every row: (index [n] int64, distance [n] float32).

    Exact without `groups`. With them, approximate, an inverted file over the centroids searched
    with matrix products: each point is compared with the `nprobe` nearest group centres, then with
    the centroids of those groups only; a point whose nearest centroid lies in an unprobed group
    gets the nearest of the probed ones.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    if groups is None or len(groups.centres) <= nprobe:
        idx, dist = _search(x, c, backend)
        return idx[:, 0], dist[:, 0]
    n_groups = len(groups.centres)
    probes, _ = _search(x, groups.centres, backend, nprobe)  # [n, nprobe] group ids
    owner = np.repeat(np.arange(len(x)), nprobe)
    by_group = np.argsort(probes.ravel(), kind="stable")
    bounds = np.searchsorted(probes.ravel()[by_group], np.arange(n_groups + 1))
    member_order = np.argsort(groups.of, kind="stable")
    member_bounds = np.searchsorted(groups.of[member_order], np.arange(n_groups + 1))

    def search_group(g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        points = owner[by_group[bounds[g]:bounds[g + 1]]]
        members = member_order[member_bounds[g]:member_bounds[g + 1]]
        if not len(points) or not len(members):
            return points[:0], points[:0], np.zeros(0, np.float32)
        # in blocks of rows: a group probed by a dense region would otherwise copy all its rows at once
        parts = [_search(x[points[s:s + ROWS_PER_TASK]], c[members], backend, threaded=False)
                 for s in range(0, len(points), ROWS_PER_TASK)]
        return points, members[np.concatenate([i[:, 0] for i, _ in parts])], np.concatenate([d[:, 0] for _, d in parts])

    best_i = np.zeros(len(x), np.int64)
    best_d = np.full(len(x), np.inf, np.float32)
    for points, idx, dist in _threaded(search_group, range(n_groups)):  # merged in group order
        better = dist < best_d[points]
        best_d[points[better]] = dist[better]
        best_i[points[better]] = idx[better]
    missed = np.flatnonzero(np.isinf(best_d))  # only groups without centroids probed
    if len(missed):
        i, d = _search(x[missed], c, backend)
        best_i[missed], best_d[missed] = i[:, 0], d[:, 0]
    return best_i, best_d


def _centroid_sums(x: np.ndarray, labels: np.ndarray, k: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster float64 sums and counts (in chunks: no float64 copy of all of `x`)."""
    sums = np.zeros((k, x.shape[1]), np.float64)
    for start in range(0, len(x), chunk):
        part = labels[start:start + chunk]
        onehot = scipy.sparse.csr_matrix((np.ones(len(part)), (part, np.arange(len(part)))), shape=(k, len(part)))
        sums += onehot @ x[start:start + chunk].astype(np.float64)
    return sums, np.bincount(labels, minlength=k)


KMEANS_PP_MAX_K = 1024
"""k-means++ is sequential over k; above this many clusters, init from distinct random points."""


def _init_centroids(x: np.ndarray, k: int, seed: int, init: Init = "k-means++") -> np.ndarray:
    """Greedy k-means++ (2 + ln k candidate draws per centre, the one lowering the potential most
    wins) on at most max(16·k, 8192) points; for k > KMEANS_PP_MAX_K or `init` "random", k distinct
    random points."""
    rng = np.random.default_rng(seed)
    if k > KMEANS_PP_MAX_K or init == "random":
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
    groups: CentroidGroups | None = None  # split k-means: the groups, for approximate assignment


def kmeans(x: np.ndarray, k: int, n_iter: int = 20, seed: int = 0, backend: Backend = "auto",
           n_init: int = 1, sample_per_centroid: int = 0, init: Init | np.ndarray = "k-means++") -> KMeansResult:
    """Lloyd's k-means; empty clusters are re-seeded with the points farthest from their centroid.

    With `n_init` > 1, the best of that many seeded runs (lowest inertia). With
    `sample_per_centroid` > 0 and more than that many points per cluster, Lloyd's iterations run
    on a random sample of `sample_per_centroid · k` points and every point is then assigned to the
    result. `init`: the seeding, or the k initial centroids.
    """
    if n_init > 1 and isinstance(init, str):
        runs = [kmeans(x, k, n_iter, seed + 7919 * r, backend, 1, sample_per_centroid, init) for r in range(n_init)]
        return min(runs, key=lambda run: float(run.distances.astype(np.float64).sum()))
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of points {n}")
    train = x
    if sample_per_centroid and n > sample_per_centroid * k:
        rng = np.random.default_rng(seed)
        train = x[np.sort(rng.choice(n, size=sample_per_centroid * k, replace=False))]
    if isinstance(init, str):
        centroids = _init_centroids(train, k, seed, init).astype(np.float32)
    else:
        centroids = np.array(init, dtype=np.float32)
    labels, dist = assign(train, centroids, backend)
    for _ in range(n_iter):
        sums, counts = _centroid_sums(train, labels, k)
        empty = np.flatnonzero(counts == 0)
        new = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        if len(empty):
            far = np.argsort(-dist, kind="stable")[: len(empty)]
            new[empty] = train[far]
        centroids = new
        new_labels, dist = assign(train, centroids, backend)
        changed = int((new_labels != labels).sum())
        labels = new_labels
        if changed == 0 and not len(empty):
            break
    if train is not x:
        labels, dist = assign(x, centroids, backend)
    return KMeansResult(centroids=centroids, labels=labels, distances=dist)


COARSE_POINTS_PER_GROUP = 256
"""The coarse k-means of `split_kmeans` runs on at most this many points per group (as faiss's
k-means samples by default): enough that the out-of-sample points spread over the groups."""


def split_kmeans(x: np.ndarray, k: int, n_groups: int, n_iter: int = 20, seed: int = 0, backend: Backend = "auto",
                 n_init: int = 1, sample_per_centroid: int = 0, nprobe: int = 1) -> KMeansResult:
    """Approximate k-means for large k: seeded as `kmeans` is, then a coarse k-means splits the
    points into `n_groups` groups, Lloyd's iterations run in each group (one group per thread) from
    the seeds that fall in it, and every point finally takes the nearest centroid of its `nprobe`
    nearest groups. An iteration costs about n·k/n_groups distances instead of n·k; centroids move
    only within their group (Lloyd's moves are local anyway). The idea of faiss's
    `two_level_clustering` (faiss.contrib.clustering), with this module's seeding and k-means."""
    if n_init > 1:
        runs = [split_kmeans(x, k, n_groups, n_iter, seed + 7919 * r, backend, 1, sample_per_centroid, nprobe)
                for r in range(n_init)]
        return min(runs, key=lambda run: float(run.distances.astype(np.float64).sum()))
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of points {n}")
    n_groups = max(1, min(n_groups, k))
    seeds = _init_centroids(x, k, seed).astype(np.float32)
    coarse = kmeans(x, n_groups, min(n_iter, 20), seed, backend, sample_per_centroid=COARSE_POINTS_PER_GROUP,
                    init="random")
    seed_group, _ = assign(seeds, coarse.centroids, backend)
    order = np.argsort(coarse.labels, kind="stable")
    bounds = np.searchsorted(coarse.labels[order], np.arange(n_groups + 1))
    seed_order = np.argsort(seed_group, kind="stable")
    seed_bounds = np.searchsorted(seed_group[seed_order], np.arange(n_groups + 1))

    def fit(g: int) -> np.ndarray:
        points = x[order[bounds[g]:bounds[g + 1]]]
        init = seeds[seed_order[seed_bounds[g]:seed_bounds[g + 1]]][: len(points)]
        if not len(init):
            return init
        return kmeans(points, len(init), n_iter, seed + 1 + g, backend, sample_per_centroid=sample_per_centroid,
                      init=init).centroids

    fitted = _threaded(fit, range(n_groups))
    centroids = np.concatenate(fitted)
    groups = CentroidGroups(coarse.centroids, np.repeat(np.arange(n_groups), [len(f) for f in fitted]))
    labels, dist = assign(x, centroids, backend, groups, nprobe)
    return KMeansResult(centroids, labels, dist, groups)


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
    sample_per_centroid: int = 0,
    method: Method = "auto",
    clusters_per_group: int = 50,
    nprobe: int = 4,
    approximate_min_clusters: int = 1000,
) -> ClusterTree:
    """Bottom-up hierarchical k-means with resampling; `levels` are cluster counts lowest→highest.

    A level runs `split_kmeans` (groups of about `clusters_per_group` clusters, `nprobe` groups
    searched per point) when `method` is "approximate", or "auto" with at least
    `approximate_min_clusters` clusters and no GPU; else exact `kmeans`. `sample_per_centroid`: see
    `kmeans`.
    """
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
        approximate = method == "approximate" or (
            method == "auto" and k >= approximate_min_clusters
            and not (_resolve(backend) == "torch" and gpu_available()))  # exact distances are cheap on a GPU
        if approximate:
            fit = functools.partial(split_kmeans, k=k, n_groups=max(1, round(k / clusters_per_group)), n_iter=n_iter,
                                    backend=backend, n_init=n_init, sample_per_centroid=sample_per_centroid,
                                    nprobe=nprobe)
        else:
            fit = functools.partial(kmeans, k=k, n_iter=n_iter, backend=backend, n_init=n_init,
                                    sample_per_centroid=sample_per_centroid)
        result = fit(points, seed=seed + depth)
        sample_size = sizes[depth] or max(1, round(0.5 * len(points) / k))
        for step in range(max(0, steps[depth] - 1)):
            subset = _resample(result.labels, result.distances, k, sample_size, resample_strategy, rng)
            if len(subset) < k:
                break
            sub = fit(points[subset], seed=seed + depth + 1000 * (step + 1))
            labels, dist = assign(points, sub.centroids, backend, sub.groups, nprobe)
            result = KMeansResult(sub.centroids, labels, dist, sub.groups)
        tree.levels.append(Level(result.centroids, result.labels, result.distances))
        if log:
            counts = np.bincount(result.labels, minlength=k)
            print(f"[curate] k-means level {depth + 1}: {len(points)} items -> {k} clusters "
                  f"(sizes min {counts.min()} median {int(np.median(counts))} max {counts.max()}, "
                  f"{steps[depth]} resampling step(s), {'approximate' if approximate else 'exact'}, "
                  f"{time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
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


def build_tree(c: ClusterConfig, x: np.ndarray, seed: int) -> tuple[ClusterTree, list[int]]:
    """The hierarchical k-means the `cluster` config asks for; also returns the cluster counts."""
    levels = list(c.levels) or auto_levels(len(x), c.points_per_leaf, c.branching, c.n_levels)
    steps = c.resampling_steps * len(levels) if len(c.resampling_steps) == 1 else list(c.resampling_steps)
    tree = hierarchical_kmeans(x, levels, c.n_iter, steps, list(c.sample_sizes) or None, c.resample_strategy,
                               seed, c.backend, n_init=c.n_init, sample_per_centroid=c.sample_per_centroid,
                               method=c.method, clusters_per_group=c.clusters_per_group, nprobe=c.nprobe,
                               approximate_min_clusters=c.approximate_min_clusters)
    return tree, levels


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
        t0 = time.perf_counter()
        tree, levels = build_tree(c, embeddings, cfg.seed)
        paths = tree.paths()
        selected = balanced_sample(tree, target, cfg.balance.strategy, cfg.seed)
        log(f"clustering: levels {levels} in {time.perf_counter() - t0:.1f} s; balanced sampling kept "
            f"{len(selected)}/{n} (target {target})")
    save_npz(cache, paths=paths, selected=selected, levels=np.asarray(levels))
    return Balanced(pool_rows, paths, selected, levels)
