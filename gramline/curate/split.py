"""Steps 2-3, `select`: exact dedup, near dedup, the held-out eval split and decontamination.

1. exact dedup: identical sha256 of the decoded pixels (gramline.curate.validate), first kept;
2. near dedup: copy-descriptor matches, one representative per connected component, preferring
   the largest image, then the largest file (gramline.curate.dedup);
3. eval split: `split.eval_fraction` of the survivors (at most `split.eval_max`), stratified by label
   when there are labels;
4. decontamination: train images that match an eval image at `dedup.decontam_threshold` (looser
   than the dedup threshold) are dropped, as DINOv2 removes near-copies of evaluation images from its
   training data (Oquab et al. 2023, arXiv 2304.07193, appendix A).

Only the metadata columns are loaded; the copy-detection views stay in the chunks' `.desc.npy`
files and are streamed by the search (gramline.curate.dedup.ViewChunks; docs/curate.md, "Memory
model"). The result is cached in the work directory (`dedup.npz`), so a resumed run skips the search.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gramline.curate.config import CurateConfig
from gramline.curate.dedup import ViewChunks, contaminated, exact_duplicates, near_duplicates
from gramline.curate.log import log
from gramline.curate.workdir import META_COLUMNS, WorkDir, save_npz


@dataclass
class Selection:
    meta: pa.Table            # META_COLUMNS for every item, in ingest order
    valid: np.ndarray         # bool [n]
    duplicate_of: np.ndarray  # int64 [n]: representative idx, -1 if not a duplicate
    dup_kind: np.ndarray      # object [n]: "", "exact", "near", "decontaminated"
    eval_mask: np.ndarray     # bool [n]
    pool_mask: np.ndarray     # bool [n]: train pool after decontamination
    valid_rows: np.ndarray    # int64 [n_valid]: row index of each valid item, in ingest order


class _Descriptors:
    """Where each valid row's copy-detection views are: its chunk's `.desc.npy` (one row per valid
    item of the chunk, in order) and the position in it. Nothing is read until a search streams it."""

    def __init__(self, work: WorkDir, chunk_rows: list[int], valid: np.ndarray) -> None:
        self.paths = [work.desc(i) for i in range(len(chunk_rows))]
        self.chunk_of_row = np.repeat(np.arange(len(chunk_rows)), chunk_rows)
        rank = np.cumsum(valid) - 1  # valid rows before this one, over all chunks
        first_row = np.concatenate([[0], np.cumsum(chunk_rows)[:-1]]).astype(np.int64)
        valid_before_chunk = np.concatenate([[0], np.cumsum(valid)])[first_row]
        self.position = rank - valid_before_chunk[self.chunk_of_row]

    def views(self, rows: np.ndarray) -> ViewChunks:
        """The views of valid `rows` (ascending), in that order."""
        chunks = self.chunk_of_row[rows]
        bounds = np.searchsorted(chunks, np.arange(len(self.paths) + 1))
        return ViewChunks([(self.paths[i], self.position[rows[bounds[i]:bounds[i + 1]]])
                           for i in range(len(self.paths)) if bounds[i + 1] > bounds[i]])


def _load_meta(work: WorkDir, n_chunks: int) -> tuple[pa.Table, list[int]]:
    tables = [pq.read_table(work.chunk(i), columns=META_COLUMNS) for i in range(n_chunks)]
    return pa.concat_tables(tables), [t.num_rows for t in tables]


def _stratified_eval(labels: np.ndarray, n_eval: int, stratify: bool, rng: np.random.Generator) -> np.ndarray:
    """Positions chosen for eval: per-label shares by largest remainder, members drawn at random."""
    n = len(labels)
    if n_eval <= 0 or n == 0:
        return np.zeros(0, np.int64)
    if not stratify or not any(labels):
        return np.sort(rng.choice(n, size=n_eval, replace=False))
    names, inverse = np.unique(labels.astype(str), return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(names))
    exact = sizes * n_eval / n
    share = np.floor(exact).astype(np.int64)
    remainder = n_eval - int(share.sum())
    order = np.lexsort((np.arange(len(names)), -(exact - share)))
    share[order[:remainder]] += 1
    share = np.minimum(share, sizes)
    chosen = [rng.choice(np.flatnonzero(inverse == c), size=int(k), replace=False) for c, k in enumerate(share) if k]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def _column(meta: pa.Table, name: str) -> np.ndarray:
    return meta.column(name).to_numpy(zero_copy_only=False)


def _deduplicate(cfg: CurateConfig, meta: pa.Table, descs: _Descriptors, valid_rows: np.ndarray,
                 duplicate_of: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """Mark exact, then near duplicates in `duplicate_of` and `kind`; returns the surviving rows."""
    t0 = time.perf_counter()
    alive = valid_rows
    if cfg.dedup.exact and len(alive):
        ex = exact_duplicates(list(_column(meta, "pixel_sha256")[alive]))
        dropped = ~ex.kept
        duplicate_of[alive[dropped]] = alive[ex.representative[dropped]]
        kind[alive[dropped]] = "exact"
        alive = alive[ex.kept]
    log(f"exact dedup: {int((kind == 'exact').sum())} duplicates ({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    if cfg.dedup.near and len(alive) > 1:
        width = _column(meta, "width")[alive].astype(np.float64)
        height = _column(meta, "height")[alive].astype(np.float64)
        nbytes = _column(meta, "file_bytes")[alive].astype(np.float64)
        # keep the largest image; among equal sizes the biggest file (least compressed)
        priority = width * height + nbytes / (nbytes.max() + 1)
        d = cfg.dedup
        nd = near_duplicates(descs.views(alive), d.threshold, priority=priority, backend=d.backend,
                             ivf_min_size=d.ivf_min_size, nprobe=d.nprobe, rescore_margin=d.rescore_margin)
        dropped = ~nd.kept
        duplicate_of[alive[dropped]] = alive[nd.representative[dropped]]
        kind[alive[dropped]] = "near"
        alive = alive[nd.kept]
        log(f"near dedup: {int(dropped.sum())} duplicates in {nd.n_edges} edges at cosine >= "
            f"{cfg.dedup.threshold} ({time.perf_counter() - t0:.1f} s)")
    return alive


def _eval_rows(cfg: CurateConfig, meta: pa.Table, alive: np.ndarray) -> np.ndarray:
    labels = np.asarray(meta.column("label_name").to_pylist(), dtype=object)[alive]
    labels = np.array(["" if v is None else v for v in labels], dtype=object)
    n_eval = round(cfg.split.eval_fraction * len(alive))
    if cfg.split.eval_max is not None:
        n_eval = min(n_eval, cfg.split.eval_max)
    rng = np.random.default_rng([cfg.seed, 1])
    return alive[_stratified_eval(labels, n_eval, cfg.split.stratify, rng)]


def _decontaminate(cfg: CurateConfig, descs: _Descriptors, train_rows: np.ndarray, eval_rows: np.ndarray,
                   kind: np.ndarray) -> None:
    """Mark train rows that match an eval row as "decontaminated" in `kind`."""
    if not (len(eval_rows) and len(train_rows)):
        return
    t0 = time.perf_counter()
    d = cfg.dedup
    hit = contaminated(descs.views(train_rows), descs.views(eval_rows), d.decontam_threshold,
                       d.backend, d.ivf_min_size, d.nprobe, d.rescore_margin)
    kind[train_rows[hit]] = "decontaminated"
    log(f"decontamination: {int(hit.sum())} train images match an eval image at cosine >= "
        f"{d.decontam_threshold} ({time.perf_counter() - t0:.1f} s)")


def select(cfg: CurateConfig, work: WorkDir, n_chunks: int) -> Selection:
    """Dedup, eval split and decontamination over the ingested chunks (cached in the work dir)."""
    meta, chunk_rows = _load_meta(work, n_chunks)
    n = meta.num_rows
    valid = np.asarray(meta.column("status").to_pylist(), dtype=object) == "ok"
    valid_rows = np.flatnonzero(valid)
    cache = work.dedup_cache
    if cache.is_file():
        saved = np.load(cache, allow_pickle=False)
        duplicate_of, kind = saved["duplicate_of"], saved["kind"].astype(object)
        eval_rows = saved["eval_rows"]
    else:
        duplicate_of = np.full(n, -1, np.int64)
        kind = np.full(n, "", dtype=object)
        descs = _Descriptors(work, chunk_rows, valid)
        alive = _deduplicate(cfg, meta, descs, valid_rows, duplicate_of, kind)
        eval_rows = _eval_rows(cfg, meta, alive)
        _decontaminate(cfg, descs, np.setdiff1d(alive, eval_rows), eval_rows, kind)
        save_npz(cache, duplicate_of=duplicate_of, kind=kind.astype(str), eval_rows=eval_rows)
    eval_mask = np.zeros(n, bool)
    eval_mask[eval_rows] = True
    pool_mask = valid & (kind == "") & ~eval_mask
    return Selection(meta, valid, duplicate_of, kind, eval_mask, pool_mask, valid_rows)
