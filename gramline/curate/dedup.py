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
features without supervision", arXiv 2304.07193, section 3 and appendix A).

Search never holds every descriptor (7.7 kB per image as float16) in RAM: the views stay in the
per-chunk files (`ViewChunks`) and stream through one chunk at a time. Below `ivf_min_size` indexed
vectors the index is exact (torch matmul, or faiss flat), float32 in RAM; from there on it is a faiss
IVF index with 8-bit scalar-quantised vectors (392 bytes per indexed vector, Jegou et al. 2011,
"Product quantization for nearest neighbor search", and the faiss index guidelines), searched
`rescore_margin` below the threshold; its candidates are re-scored exactly on the stored descriptors,
so `cosine >= threshold` is decided exactly for every candidate (the IVF probe decides only which
pairs are looked at). Memory model and numbers: docs/curate.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse
from PIL import Image
from scipy.sparse.csgraph import connected_components

from gramline.errors import InputError

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


# --------------------------------------------------------------------------- descriptor storage


class ViewChunks:
    """Descriptor views [n, V, D] kept where they are: per-chunk `.npy` files (read one at a time
    through a memory map, copying only the rows asked for) or in-memory arrays. Each piece is
    (file or array, rows of it to use; None = all); images are numbered in piece order."""

    def __init__(self, pieces: Sequence[tuple[Path | np.ndarray, np.ndarray | None]]) -> None:
        self._pieces: list[tuple[Path | np.ndarray, np.ndarray | None]] = []
        sizes, shape = [], (view_count(3), DESCRIPTOR_DIM)  # the default views, when there are no pieces
        for source, rows in pieces:
            array = self._open(source)
            if array.ndim != 3:
                raise InputError(str(source), f"descriptor array has shape {array.shape}", "[images, views, dim]")
            picked = None if rows is None else np.asarray(rows, np.int64).reshape(-1)
            if picked is not None and len(picked) and not (0 <= picked.min() and picked.max() < len(array)):
                raise InputError(str(source), f"has {len(array)} descriptor rows but row {picked.max()} is asked for",
                                 "one row per valid image of the chunk")
            if len(self._pieces) and array.shape[1:] != shape:
                raise InputError(str(source), f"descriptor views {array.shape[1:]} differ from {shape}",
                                 "the same views per image in every chunk")
            shape = array.shape[1:]
            self._pieces.append((source, picked))
            sizes.append(len(array) if picked is None else len(picked))
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self.n_views, self.dim = int(shape[0]), int(shape[1])

    @staticmethod
    def _open(source: Path | np.ndarray) -> np.ndarray:
        return source if isinstance(source, np.ndarray) else np.load(source, mmap_mode="r")

    @classmethod
    def of(cls, views: np.ndarray | ViewChunks) -> ViewChunks:
        return views if isinstance(views, ViewChunks) else cls([(np.asarray(views), None)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def blocks(self, max_images: int = 1024) -> Iterator[tuple[int, np.ndarray]]:
        """(first image, float32 [m, V, D]) of at most `max_images` images, in order."""
        for k, (source, rows) in enumerate(self._pieces):
            array = self._open(source)  # a memory map, unmapped when the next piece replaces it
            part = array if rows is None else array[rows]  # only these rows are read
            for start in range(0, len(part), max_images):
                yield int(self.offsets[k]) + start, np.asarray(part[start:start + max_images], np.float32)

    def gather(self, images: np.ndarray, views: np.ndarray) -> np.ndarray:
        """float32 [m, D]: view `views[i]` of image `images[i]`; reads only the pieces concerned."""
        out = np.empty((len(images), self.dim), np.float32)
        piece = np.searchsorted(self.offsets, images, side="right") - 1
        for k in np.unique(piece):
            sel = np.flatnonzero(piece == k)
            source, rows = self._pieces[k]
            local = images[sel] - self.offsets[k]
            array = self._open(source)
            out[sel] = array[local if rows is None else rows[local], views[sel]]
            del array
        return out


# --------------------------------------------------------------------------- search


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


POINTS_PER_LIST = 20  # IVF training vectors per list (faiss warns below 39; k-means needs far fewer)
RangeFn = Callable[[np.ndarray, float], tuple[np.ndarray, np.ndarray, np.ndarray]]
_EMPTY = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))


@dataclass
class _Index:
    """Range search over the database vectors: (queries, radius) → (query row, database row, score).
    Database row r is view `r % n_views` of image `r // n_views`; an `approximate` index gives
    compressed scores, re-scored exactly before any decision."""

    search: RangeFn
    n_views: int
    approximate: bool


def _database(db: ViewChunks, whole_only: bool) -> tuple[int, Callable[[np.ndarray], np.ndarray]]:
    """Vectors per image and the [m, V, D] → [m * that, D] selection of an index over `db`."""
    if whole_only:
        return 1, lambda block: np.ascontiguousarray(block[:, 0])
    return db.n_views, lambda block: block.reshape(-1, block.shape[-1])


def _build_index(db: ViewChunks, whole_only: bool, backend: Backend, ivf_min_size: int, nprobe: int) -> _Index:
    """Exact search (all vectors in RAM, float32) below `ivf_min_size` database vectors or with the
    torch backend; from there on the bounded IVF index streamed from the pieces (faiss)."""
    per_image, select = _database(db, whole_only)
    exact = backend == "torch" or len(db) * per_image < ivf_min_size or (backend == "auto" and not _faiss_available())
    if not exact:
        return _Index(_ivf_search(db, per_image, select, nprobe), per_image, approximate=True)
    parts = [select(block) for _, block in db.blocks()]
    vectors = np.concatenate(parts) if parts else np.zeros((0, db.dim), np.float32)
    search = _torch_search(vectors) if backend != "faiss" else _flat_search(vectors)
    return _Index(search, per_image, approximate=False)


def _range_fn(index: Any) -> RangeFn:
    def search(q: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not len(q) or not index.ntotal:
            return _EMPTY
        # faiss keeps scores > radius; step just below so that ">= radius" holds
        below = float(np.nextafter(np.float32(radius), np.float32(-np.inf)))
        lims, sims, ids = index.range_search(np.ascontiguousarray(q, dtype=np.float32), below)
        rows = np.repeat(np.arange(len(q)), np.diff(lims).astype(np.int64))
        return rows, ids.astype(np.int64), sims.astype(np.float32)

    return search


def _flat_search(vectors: np.ndarray) -> RangeFn:
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return _range_fn(index)


def _ivf_search(db: ViewChunks, per_image: int, select: Callable[[np.ndarray], np.ndarray], nprobe: int) -> RangeFn:
    """faiss IVF over 8-bit scalar-quantised vectors (dim + 8 bytes per vector in RAM), filled
    piece by piece. 4√N lists (the low end of the faiss guidelines), trained on a sample of
    POINTS_PER_LIST vectors per list: the float32 sample, 80√N vectors, is the only part of the
    build that is not a piece at a time. The vectors themselves are quantised, not their residuals
    to the list centroid: no residual copy of the sample, and an error (< 0.005 in cosine on unit
    vectors) well inside the default `rescore_margin`."""
    import faiss

    n_vec = len(db) * per_image
    nlist = max(1, int(min(max(16, 4 * math.sqrt(n_vec)), n_vec // POINTS_PER_LIST)))
    size = min(n_vec, POINTS_PER_LIST * nlist)
    sample = np.sort(np.random.default_rng(0).choice(n_vec, size=size, replace=False))
    index = faiss.index_factory(db.dim, f"IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
    index.by_residual = False
    index.cp.min_points_per_centroid = POINTS_PER_LIST
    index.train(db.gather(sample // per_image, sample % per_image))
    for _, block in db.blocks():
        index.add(select(block))
    index.nprobe = nprobe
    return _range_fn(index)


def _torch_search(db: np.ndarray, score_bytes: int = 256 << 20) -> RangeFn:
    """Exact search by matmul, in query blocks whose score matrix stays under `score_bytes`."""
    import torch

    dbt = torch.from_numpy(np.ascontiguousarray(db, dtype=np.float32))
    block = max(1, score_bytes // (4 * max(1, len(db))))

    def search(q: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
        rows, cols, sims = [], [], []
        for start in range(0, len(qt), block):
            scores = qt[start:start + block] @ dbt.T
            r, c = torch.nonzero(scores >= radius, as_tuple=True)
            rows.append(r.numpy().astype(np.int64) + start)
            cols.append(c.numpy().astype(np.int64))
            sims.append(scores[r, c].numpy())
        if not rows:
            return _EMPTY
        return np.concatenate(rows), np.concatenate(cols), np.concatenate(sims)

    return search


def _matches(query: ViewChunks, query_whole_only: bool, db: ViewChunks, index: _Index, threshold: float,
             rescore_margin: float, exclude_self: bool, rescore_batch: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Unique (query image, database image) pairs with some indexed view pair at cosine >= threshold.

    The queries stream a block at a time; an approximate index is searched `rescore_margin` below
    the threshold and each candidate is re-scored on the stored descriptors (the query's in the
    block at hand, the database's read back `rescore_batch` at a time), so that the decision is the
    exact one for every candidate. Only the matching pairs (int arrays) accumulate.
    """
    per_query, select = _database(query, query_whole_only)
    radius = threshold - rescore_margin if index.approximate else threshold
    found = [np.zeros((0, 2), np.int64)]
    for start, block in query.blocks():
        vectors = select(block)
        r, c, _ = index.search(vectors, radius)
        q_img, d_img = r // per_query + start, c // index.n_views
        if exclude_self:
            r, c, q_img, d_img = (a[q_img != d_img] for a in (r, c, q_img, d_img))
        if index.approximate:
            score = np.concatenate([np.zeros(0, np.float32)] + [
                np.einsum("ij,ij->i", vectors[r[i:i + rescore_batch]],
                          db.gather(d_img[i:i + rescore_batch], c[i:i + rescore_batch] % index.n_views))
                for i in range(0, len(r), rescore_batch)])
            q_img, d_img = q_img[score >= threshold], d_img[score >= threshold]
        found.append(np.unique(np.stack([q_img, d_img], axis=1), axis=0))
    pairs = np.unique(np.concatenate(found), axis=0)
    return pairs[:, 0], pairs[:, 1]


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


def near_duplicates(
    views: np.ndarray | ViewChunks,
    threshold: float,
    priority: np.ndarray | None = None,
    backend: Backend = "auto",
    ivf_min_size: int = 20_000,
    nprobe: int = 16,
    rescore_margin: float = 0.02,
) -> DedupResult:
    """Connected components of the near-duplicate graph over `views` [n, V, D] (view 0 = whole):
    every view of each image against an index of the whole views."""
    views = ViewChunks.of(views)
    n = len(views)
    if n == 0:
        return DedupResult(np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
    index = _build_index(views, True, backend, ivf_min_size, nprobe)
    rows, cols = _matches(views, False, views, index, threshold, rescore_margin, exclude_self=True)
    labels = components_from_edges(n, rows, cols)
    pri = np.zeros(n) if priority is None else np.asarray(priority, dtype=np.float64)
    return DedupResult(representative=_pick_representatives(labels, pri), component=labels, n_edges=len(rows))


def contaminated(
    train_views: np.ndarray | ViewChunks,
    eval_views: np.ndarray | ViewChunks,
    threshold: float,
    backend: Backend = "auto",
    ivf_min_size: int = 20_000,
    nprobe: int = 16,
    rescore_margin: float = 0.02,
) -> np.ndarray:
    """Boolean [n_train]: the train image matches some eval image (views of either against the
    whole view of the other). The smaller side is indexed (its whole views, then all its views) and
    the larger side streams against it."""
    train, evals = ViewChunks.of(train_views), ViewChunks.of(eval_views)
    hit = np.zeros(len(train), bool)
    if not len(train) or not len(evals):
        return hit
    eval_indexed = len(evals) <= len(train)
    small, large = (evals, train) if eval_indexed else (train, evals)
    for large_whole_only in (False, True):  # large views vs small whole views, large whole vs small views
        index = _build_index(small, not large_whole_only, backend, ivf_min_size, nprobe)
        rows, cols = _matches(large, large_whole_only, small, index, threshold, rescore_margin, exclude_self=False)
        hit[rows if eval_indexed else cols] = True
    return hit
