"""Exact and near-duplicate detection, and decontamination against an eval split.

Near-duplicates use a copy-detection descriptor that needs no trained weights (so that dedup works
offline; a random-init network is no copy detector): luma on a 16x16 grid plus chroma on an
8x8 grid (weighted x2), each channel's mean removed, L2-normalised, 384 numbers. It describes
layout: resizing and re-encoding leave it almost unchanged, and so do brightness and colour shifts
(a recoloured copy is a copy, as in the training augmentations of SSCD, Pizzi et al. 2022, "A
self-supervised descriptor for image copy detection", arXiv 2202.10261). Removing the chroma means
matters: otherwise every picture with the same background colour looks alike. A crop shifts and
zooms the layout, so each image also gets `grid`² sub-views at `scale` of its size (a 3x3 grid of
90% crops): a copy cropped by a few per cent on any side lines up with one of them. Two images
match when any view of one and the whole view of the other have cosine >= threshold. The index
holds whole views only (n x 384); every view is a query. The default threshold (0.91) lies between
the scores of copy pairs and of distinct pairs; the measurements are in docs/curate.md. A trained
copy detector (SSCD, which DINOv2 used) separates harder cases (same layout, different content)
better; this descriptor sees only layout and colour at low resolution.

Matches become graph edges; connected components keep one representative (highest caller
priority, in curation the largest image, then the largest file; ties: earliest), as in the
deduplication of DINOv2's data pipeline (Oquab et al. 2023, "DINOv2: Learning robust visual
features without supervision", arXiv 2304.07193, section 3 and appendix A). Search: an exact
chunked torch matmul, or faiss (IVF from `ivf_min_size` database images on; exact below that when
asked for explicitly).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.sparse
from PIL import Image
from scipy.sparse.csgraph import connected_components

LUMA_CELLS, CHROMA_CELLS, CHROMA_WEIGHT = 16, 8, 2.0
DESCRIPTOR_DIM = LUMA_CELLS**2 + 2 * CHROMA_CELLS**2  # 384
Backend = Literal["auto", "faiss", "torch"]


# --------------------------------------------------------------------------- descriptor


THUMB = 80  # descriptor thumbnail side; 90% views are then 72 px at integer offsets


def view_count(grid: int) -> int:
    """Views per image: the whole image, plus the grid x grid sub-views when `grid` > 1."""
    return 1 + grid**2 if grid > 1 else 1


def _view_boxes(grid: int, scale: float) -> np.ndarray:
    """[(y0, y1, x0, x1)] in thumbnail pixels: the whole thumbnail, then the grid of sub-views."""
    boxes = [(0, THUMB, 0, THUMB)]
    if grid > 1:
        side = round(THUMB * scale)
        for gy in range(grid):
            for gx in range(grid):
                y = round((THUMB - side) * gy / (grid - 1))
                x = round((THUMB - side) * gx / (grid - 1))
                boxes.append((y, y + side, x, x + side))
    return np.asarray(boxes, dtype=np.int64)


def _grid_means(integral: np.ndarray, boxes: np.ndarray, cells: int) -> np.ndarray:
    """[V, cells, cells, C] means of each box split into a cells x cells grid (summed-area table)."""
    frac = np.linspace(0.0, 1.0, cells + 1)
    ys = np.rint(boxes[:, :1] + (boxes[:, 1:2] - boxes[:, :1]) * frac).astype(np.int64)
    xs = np.rint(boxes[:, 2:3] + (boxes[:, 3:4] - boxes[:, 2:3]) * frac).astype(np.int64)
    corners = integral[ys[:, :, None], xs[:, None, :]]
    sums = corners[:, 1:, 1:] - corners[:, :-1, 1:] - corners[:, 1:, :-1] + corners[:, :-1, :-1]
    area = np.diff(ys)[:, :, None] * np.diff(xs)[:, None, :]
    return sums / area[..., None]


def descriptor_views(image: Image.Image, grid: int = 3, scale: float = 0.9) -> np.ndarray:
    """[1 + grid², 384] float32: the whole image first, then a grid of `scale`-sized sub-views.

    Each view: 16x16 luma means + 8x8 chroma (Cb, Cr) means x2, each channel's view mean removed,
    L2-normalised. `grid` <= 1 gives the whole-image view only.
    """
    thumb = image.convert("RGB").resize((THUMB, THUMB), Image.Resampling.BOX, reducing_gap=2.0)
    ycc = np.asarray(thumb.convert("YCbCr"), dtype=np.float64)
    integral = np.zeros((THUMB + 1, THUMB + 1, 3))
    integral[1:, 1:] = ycc.cumsum(0).cumsum(1)
    boxes = _view_boxes(grid, scale)
    luma = _grid_means(integral, boxes, LUMA_CELLS)[..., 0].reshape(len(boxes), -1)
    chroma = _grid_means(integral, boxes, CHROMA_CELLS)[..., 1:]
    chroma = (chroma - chroma.mean(axis=(1, 2), keepdims=True)).reshape(len(boxes), -1)
    vec = np.concatenate([luma - luma.mean(axis=1, keepdims=True), CHROMA_WEIGHT * chroma], axis=1)
    norm = np.linalg.norm(vec, axis=1, keepdims=True)
    return (vec / np.maximum(norm, 1e-6)).astype(np.float32)


# --------------------------------------------------------------------------- search


def _faiss_available() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return True


RangeFn = Callable[[np.ndarray, float], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _build_index(db: np.ndarray, backend: Backend, ivf_min_size: int, nprobe: int) -> RangeFn:
    """A range-search function over the L2-normalised rows of `db`: (queries, threshold) →
    (query row, database row, cosine) for every pair with cosine >= threshold.

    "auto": exact torch matmul below `ivf_min_size` database rows (faster than exact faiss there),
    faiss IVF from there on when faiss is installed (exact search grows as n²; bench/curate.py
    compares them, docs/curate.md has numbers).
    """
    if backend == "torch" or (backend == "auto" and (len(db) < ivf_min_size or not _faiss_available())):
        return _torch_index(db)
    return _faiss_index(db, ivf_min_size, nprobe)


def _faiss_index(db: np.ndarray, ivf_min_size: int, nprobe: int) -> RangeFn:
    import faiss

    dim = db.shape[1]
    index: Any
    if len(db) >= ivf_min_size:
        nlist = int(min(max(16, 4 * math.sqrt(len(db))), len(db) // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        index.train(db[np.sort(rng.choice(len(db), size=min(len(db), nlist * 64), replace=False))])
        index.add(db)
        index.nprobe = nprobe
    else:
        index = faiss.IndexFlatIP(dim)
        index.add(db)

    def search(q: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not len(q) or not index.ntotal:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        # faiss keeps scores > radius; step just below so that ">= threshold" holds
        radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
        lims, sims, ids = index.range_search(np.ascontiguousarray(q, dtype=np.float32), radius)
        rows = np.repeat(np.arange(len(q)), np.diff(lims).astype(np.int64))
        return rows, ids.astype(np.int64), sims.astype(np.float32)

    return search


def _torch_index(db: np.ndarray, score_bytes: int = 256 << 20) -> RangeFn:
    """Exact search by matmul, in query blocks whose score matrix stays under `score_bytes`."""
    import torch

    dbt = torch.from_numpy(np.ascontiguousarray(db, dtype=np.float32))
    block = max(1, score_bytes // (4 * max(1, len(db))))

    def search(q: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
        rows, cols, sims = [], [], []
        for start in range(0, len(qt), block):
            scores = qt[start:start + block] @ dbt.T
            r, c = torch.nonzero(scores >= threshold, as_tuple=True)
            rows.append(r.numpy().astype(np.int64) + start)
            cols.append(c.numpy().astype(np.int64))
            sims.append(scores[r, c].numpy())
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(rows), np.concatenate(cols), np.concatenate(sims)

    return search


# --------------------------------------------------------------------------- dedup


@dataclass
class DedupResult:
    representative: np.ndarray  # [n] index of the item kept for each item (itself when kept)
    component: np.ndarray       # [n] component id
    n_edges: int

    @property
    def kept(self) -> np.ndarray:
        return self.representative == np.arange(len(self.representative))


def _pick_representatives(labels: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Per component, the member with the highest priority (ties: lowest index)."""
    n = len(labels)
    order = np.lexsort((np.arange(n), -priority, labels))  # by label, then priority desc, then index
    first = np.ones(n, bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    rep_of_label = np.empty(labels.max() + 1 if n else 0, np.int64)
    rep_of_label[labels[order][first]] = order[first]
    return rep_of_label[labels]


def components_from_edges(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    graph = scipy.sparse.coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64)


def exact_duplicates(hashes: Sequence[str], priority: np.ndarray | None = None) -> DedupResult:
    """Group identical content hashes; keep the highest-priority (then earliest) of each group."""
    n = len(hashes)
    _, labels = np.unique(np.asarray(hashes, dtype=object).astype(str), return_inverse=True)
    labels = labels.astype(np.int64).reshape(-1)
    pri = np.zeros(n) if priority is None else np.asarray(priority, dtype=np.float64)
    rep = _pick_representatives(labels, pri) if n else np.zeros(0, np.int64)
    return DedupResult(representative=rep, component=labels, n_edges=int(n - len(np.unique(labels))) if n else 0)


def view_matches(
    query_views: np.ndarray,
    database: np.ndarray,
    threshold: float,
    backend: Backend = "auto",
    ivf_min_size: int = 20_000,
    nprobe: int = 16,
    chunk_images: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """Unique (query image, database image) pairs where some view of the query image has cosine
    >= threshold with the database image's whole view. `query_views` [nq, V, D] (float16 or 32),
    `database` [nd, D]."""
    nq, n_views, dim = query_views.shape
    index = _build_index(np.ascontiguousarray(database, dtype=np.float32), backend, ivf_min_size, nprobe)
    rows, cols = [], []
    for start in range(0, nq, chunk_images):
        block = np.ascontiguousarray(query_views[start:start + chunk_images], dtype=np.float32).reshape(-1, dim)
        r, c, _ = index(block, threshold)
        rows.append(r // n_views + start)
        cols.append(c)
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = np.unique(np.stack([np.concatenate(rows), np.concatenate(cols)], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def near_duplicates(
    views: np.ndarray,
    threshold: float,
    priority: np.ndarray | None = None,
    backend: Backend = "auto",
    ivf_min_size: int = 20_000,
    nprobe: int = 16,
) -> DedupResult:
    """Connected components of the near-duplicate graph over `views` [n, V, D] (view 0 = whole)."""
    n = len(views)
    rows, cols = view_matches(views, views[:, 0], threshold, backend, ivf_min_size, nprobe)
    keep = rows != cols
    rows, cols = rows[keep], cols[keep]
    labels = components_from_edges(n, rows, cols)
    pri = np.zeros(n) if priority is None else np.asarray(priority, dtype=np.float64)
    return DedupResult(representative=_pick_representatives(labels, pri), component=labels, n_edges=len(rows))


def contaminated(
    train_views: np.ndarray,
    eval_views: np.ndarray,
    threshold: float,
    backend: Backend = "auto",
    ivf_min_size: int = 20_000,
    nprobe: int = 16,
) -> np.ndarray:
    """Boolean [n_train]: the train image matches some eval image (views of either against the
    whole view of the other)."""
    hit = np.zeros(len(train_views), bool)
    if not len(train_views) or not len(eval_views):
        return hit
    rows, _ = view_matches(train_views, eval_views[:, 0], threshold, backend, ivf_min_size, nprobe)
    hit[rows] = True
    _, cols = view_matches(eval_views, train_views[:, 0], threshold, backend, ivf_min_size, nprobe)
    hit[cols] = True
    return hit
