"""Curate stage: ingest, validate, deduplicate, cluster-balance and shard an image collection.

    python -m gramline.stages.curate --source URI [--source URI ...] --out-dataset DIR
        [--preset tiny|large] [--config FILE] [--set key=value ...] [--executor-output FILE]

Sources: directories, .tar archives, .parquet/.csv manifests, s3://bucket/prefix, and
`synthetic:n=N,size=S,seed=K` (gramline.data.ingest). Steps, in order:

1. ingest + validate (threads): every item is decoded, made upright RGB, hashed and described;
   rejects go to `quarantine.parquet` with their reason. Written in chunks of `ingest.chunk_size`.
2. exact dedup (sha256 of the decoded pixels), then near-dup (copy descriptor, connected components,
   one representative per component), all recorded in `duplicates.parquet`.
3. held-out eval split (stratified by label when there are labels), then decontamination: train
   images that match an eval image at `dedup.decontam_threshold` are dropped.
4. embed the train pool (`embed.backbone`), hierarchical k-means with resampling, balanced
   sampling to `balance.target` (gramline.data.cluster).
5. shards + index.parquet + stats.json + report.html + manifest.json (last), locally or with the
   shards on `output.shards_uri` (uploaded under a temporary prefix, then moved; the manifest is
   written after every shard is in place).

Resumable: work lives next to the output (`.<out>.curate-work/`), each chunk and step written
atomically; a re-run with the same sources and config continues after the last complete chunk and
produces the same dataset as one clean run. The work directory is removed after success.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import itertools
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.exceptions
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from gramline.artifacts import MANIFEST, read_manifest, write_manifest
from gramline.config import dump_config
from gramline.data import s3
from gramline.data.cluster import auto_levels, balanced_sample, hierarchical_kmeans, size_summary
from gramline.data.curate_config import CurateConfig, load_curate_config
from gramline.data.curate_report import Progress, log, render_html, thumbnail_uri
from gramline.data.dedup import (
    DESCRIPTOR_DIM,
    contaminated,
    descriptor_views,
    exact_duplicates,
    near_duplicates,
)
from gramline.data.embed import LAYOUT_DIM, Embedder, build_embedder, colour_layout
from gramline.data.ingest import Item, Source, open_source
from gramline.data.shards import INDEX, STATS, DatasetWriter, ShardSample
from gramline.data.validate import Rejection, validate_image
from gramline.errors import InputError
from gramline.io import atomic_path, remove_stale_temps, write_bytes_atomic, write_json_atomic
from gramline.stages.common import emit_executor_output, run_stage, stage_parser

STAGE = "curate"
WORK_VERSION = 1
QUARANTINE = "quarantine.parquet"
DUPLICATES = "duplicates.parquet"
REPORT = "report.html"

CHUNK_SCHEMA = pa.schema([
    ("idx", pa.int64()), ("key", pa.string()), ("source", pa.string()), ("ref", pa.string()),
    ("location", pa.string()), ("status", pa.string()), ("detail", pa.string()),
    ("label_name", pa.string()), ("caption", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("source_format", pa.string()), ("source_mode", pa.string()), ("reencoded", pa.bool_()),
    ("pixel_sha256", pa.string()), ("file_sha256", pa.string()), ("file_bytes", pa.int64()),
    ("image_ext", pa.string()),
    ("image", pa.binary()), ("seg", pa.binary()),
])
META_COLUMNS = [n for n in CHUNK_SCHEMA.names if n not in ("image", "seg")]


# --------------------------------------------------------------------------- work directory


class WorkDir:
    """Intermediate results next to the output; a different plan (sources/config) starts afresh."""

    def __init__(self, out_dir: Path, plan: dict[str, Any]) -> None:
        self.root = out_dir.parent / f".{out_dir.name}.curate-work"
        self.plan = plan
        digest = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
        plan_file = self.root / "plan.json"
        if plan_file.is_file():
            try:
                same = json.loads(plan_file.read_text()).get("digest") == digest
            except ValueError:
                same = False
            if not same:
                log(f"work directory {self.root} is from other sources or config: starting afresh")
                shutil.rmtree(self.root)
        (self.root / "ingest").mkdir(parents=True, exist_ok=True)
        (self.root / "embed").mkdir(parents=True, exist_ok=True)
        for sub in (self.root, self.root / "ingest", self.root / "embed"):
            remove_stale_temps(sub)  # temp names of writes a kill interrupted
        if not plan_file.is_file():
            write_json_atomic(plan_file, {"digest": digest, **plan})

    def chunk(self, i: int) -> Path:
        return self.root / "ingest" / f"chunk-{i:06d}.parquet"

    def desc(self, i: int) -> Path:
        return self.root / "ingest" / f"chunk-{i:06d}.desc.npy"

    def layout(self, i: int) -> Path:
        return self.root / "ingest" / f"chunk-{i:06d}.layout.npy"

    def embedding(self, i: int) -> Path:
        return self.root / "embed" / f"emb-{i:06d}.npy"

    def done_chunks(self) -> int:
        n = 0
        while self.chunk(n).is_file():
            n += 1
        return n

    @property
    def ingest_done(self) -> Path:
        return self.root / "ingest" / "done.json"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def _save_npz(path: Path, **arrays: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


# --------------------------------------------------------------------------- step 1: ingest + validate


@dataclass
class _Processed:
    row: dict[str, Any]
    desc: np.ndarray | None    # copy-detection views (dedup)
    layout: np.ndarray | None  # colour layout (the offline clustering embedding)


def _process(idx: int, key: str, item: Item, cfg: CurateConfig) -> _Processed:
    row: dict[str, Any] = {name: None for name in CHUNK_SCHEMA.names}
    row.update(idx=idx, key=key, source=item.source, ref=item.ref, location=item.location,
               label_name=item.label_name, caption=item.caption, detail="")
    if item.rejection is not None:
        row["status"], row["detail"] = item.rejection
        return _Processed(row, None, None)
    assert item.load is not None
    try:
        payload = item.load()
    except (OSError, InputError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
        row["status"], row["detail"] = "unreadable", f"{type(err).__name__}: {err}"
        return _Processed(row, None, None)
    if payload.label_name is not None:
        row["label_name"] = payload.label_name
    if payload.caption is not None:
        row["caption"] = payload.caption
    im = cfg.images
    result = validate_image(payload.data, min_side=im.min_side, max_pixels=im.max_pixels, max_side=im.max_side,
                            jpeg_quality=im.jpeg_quality, background=im.background)
    if isinstance(result, Rejection):
        row["status"], row["detail"] = result.reason, result.detail
        return _Processed(row, None, None)
    seg = payload.seg
    if seg is not None:
        with Image.open(io.BytesIO(seg)) as mask:
            if mask.size != (result.width, result.height):
                from gramline.data.synthetic import encode_png

                seg = encode_png(np.asarray(mask.resize((result.width, result.height), Image.Resampling.NEAREST)))
    row.update(status="ok", width=result.width, height=result.height, source_format=result.source_format,
               source_mode=result.source_mode, reencoded=result.reencoded, pixel_sha256=result.pixel_sha256,
               file_sha256=result.file_sha256, file_bytes=len(payload.data), image_ext=result.ext,
               image=result.data, seg=seg)
    desc = descriptor_views(result.image, cfg.dedup.view_grid, cfg.dedup.view_scale).astype(np.float16)
    return _Processed(row, desc, colour_layout(result.image).astype(np.float16))


def _n_views(cfg: CurateConfig) -> int:
    return 1 + cfg.dedup.view_grid ** 2 if cfg.dedup.view_grid > 1 else 1


def _all_items(sources: Sequence[Source]) -> Iterator[Item]:
    for source in sources:
        yield from source.items()


def _seen_keys(work: WorkDir, n_chunks: int) -> set[str]:
    keys: set[str] = set()
    for i in range(n_chunks):
        keys.update(pq.read_table(work.chunk(i), columns=["key"]).column("key").to_pylist())
    return keys


def ingest(sources: Sequence[Source], cfg: CurateConfig, work: WorkDir) -> int:
    """Load, validate and describe every item into work chunks; returns the number of items."""
    if work.ingest_done.is_file():
        total = int(json.loads(work.ingest_done.read_text())["total"])
        log(f"ingest: already complete ({total} items), skipping")
        return total
    size = cfg.ingest.chunk_size
    n_done = work.done_chunks()
    start = n_done * size
    if n_done:
        log(f"ingest: resuming after {n_done} complete chunk(s) ({start} items)")
    hints = [s.size_hint() for s in sources]
    total_hint = sum(h for h in hints if h is not None) if all(h is not None for h in hints) else None
    keys = _seen_keys(work, n_done)
    workers = cfg.ingest.workers or os.cpu_count() or 1
    progress = Progress("ingest+validate", total_hint, start_at=start)
    counts = {"ok": 0, "quarantined": 0}
    items = itertools.islice(enumerate(_all_items(sources)), start, None)
    chunk_id, idx = n_done, start
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        while batch := list(itertools.islice(items, size)):
            jobs = []
            for idx, item in batch:
                key = item.key
                n = 1
                while key in keys:  # the same reference twice (e.g. a repeated tar member)
                    key = hashlib.sha1(f"{item.source}\0{item.ref}\0{n}".encode()).hexdigest()[:20]
                    n += 1
                keys.add(key)
                jobs.append((idx, key, item))
            done = list(pool.map(lambda job: _process(job[0], job[1], job[2], cfg), jobs))
            descs = [p.desc for p in done if p.desc is not None]
            desc = np.stack(descs) if descs else np.zeros((0, _n_views(cfg), DESCRIPTOR_DIM), np.float16)
            layouts = [p.layout for p in done if p.layout is not None]
            layout = np.stack(layouts) if layouts else np.zeros((0, LAYOUT_DIM), np.float16)
            # arrays first: the parquet, written last, marks the chunk complete
            _save_npy(work.desc(chunk_id), desc)
            _save_npy(work.layout(chunk_id), layout)
            table = pa.Table.from_pylist([p.row for p in done], schema=CHUNK_SCHEMA)
            with atomic_path(work.chunk(chunk_id)) as tmp:
                pq.write_table(table, tmp)
            ok = sum(p.desc is not None for p in done)
            counts["ok"] += ok
            counts["quarantined"] += len(done) - ok
            chunk_id += 1
            progress.update(idx + 1, counts)
    total = idx + 1 if chunk_id > n_done else start
    progress.finish(counts)
    if total == 0:
        raise InputError("--source " + " ".join(s.uri for s in sources), "yielded no items", "at least one image")
    write_json_atomic(work.ingest_done, {"total": total, "chunks": chunk_id})
    return total


# --------------------------------------------------------------------------- step 2-3: dedup, split, decontam


@dataclass
class Selection:
    meta: pa.Table            # META_COLUMNS for every item, in ingest order
    valid: np.ndarray         # bool [n]
    duplicate_of: np.ndarray  # int64 [n]: representative idx, -1 if not a duplicate
    dup_kind: np.ndarray      # object [n]: "", "exact", "near", "decontaminated"
    eval_mask: np.ndarray     # bool [n]
    pool_mask: np.ndarray     # bool [n]: train pool after decontamination
    descs: np.ndarray         # float16 [n_valid, V, D] in ingest order of valid rows
    valid_rows: np.ndarray    # int64 [n_valid]: row index of each descriptor


def _load_meta(work: WorkDir, n_chunks: int) -> tuple[pa.Table, np.ndarray]:
    tables = [pq.read_table(work.chunk(i), columns=META_COLUMNS) for i in range(n_chunks)]
    descs = [np.load(work.desc(i)) for i in range(n_chunks)]
    return pa.concat_tables(tables), np.concatenate(descs)


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


def select(cfg: CurateConfig, work: WorkDir, n_chunks: int) -> Selection:
    meta, descs = _load_meta(work, n_chunks)
    n = meta.num_rows
    valid = np.asarray(meta.column("status").to_pylist(), dtype=object) == "ok"
    valid_rows = np.flatnonzero(valid)
    duplicate_of = np.full(n, -1, np.int64)
    kind = np.full(n, "", dtype=object)
    cache = work.root / "dedup.npz"
    if cache.is_file():
        saved = np.load(cache, allow_pickle=False)
        duplicate_of, kind = saved["duplicate_of"], saved["kind"].astype(object)
        eval_rows = saved["eval_rows"]
    else:
        t0 = time.perf_counter()
        alive = valid_rows
        if cfg.dedup.exact and len(alive):
            hashes = meta.column("pixel_sha256").to_numpy(zero_copy_only=False)[alive]
            ex = exact_duplicates(list(hashes))
            dropped = ~ex.kept
            duplicate_of[alive[dropped]] = alive[ex.representative[dropped]]
            kind[alive[dropped]] = "exact"
            alive = alive[ex.kept]
        log(f"exact dedup: {int((kind == 'exact').sum())} duplicates ({time.perf_counter() - t0:.1f} s)")
        t0 = time.perf_counter()
        row_of_desc = np.full(n, -1, np.int64)
        row_of_desc[valid_rows] = np.arange(len(valid_rows))
        if cfg.dedup.near and len(alive) > 1:
            width = meta.column("width").to_numpy(zero_copy_only=False)[alive].astype(np.float64)
            height = meta.column("height").to_numpy(zero_copy_only=False)[alive].astype(np.float64)
            nbytes = meta.column("file_bytes").to_numpy(zero_copy_only=False)[alive].astype(np.float64)
            # keep the largest image; among equal sizes the biggest file (least compressed)
            priority = width * height + nbytes / (nbytes.max() + 1)
            nd = near_duplicates(descs[row_of_desc[alive]], cfg.dedup.threshold,  # float16, cast per block
                                 priority=priority, backend=cfg.dedup.backend,
                                 ivf_min_size=cfg.dedup.ivf_min_size, nprobe=cfg.dedup.nprobe)
            dropped = ~nd.kept
            duplicate_of[alive[dropped]] = alive[nd.representative[dropped]]
            kind[alive[dropped]] = "near"
            alive = alive[nd.kept]
            log(f"near dedup: {int(dropped.sum())} duplicates in {nd.n_edges} edges at cosine >= "
                f"{cfg.dedup.threshold} ({time.perf_counter() - t0:.1f} s)")
        # eval split
        labels = np.asarray(meta.column("label_name").to_pylist(), dtype=object)[alive]
        labels = np.array(["" if v is None else v for v in labels], dtype=object)
        n_eval = round(cfg.split.eval_fraction * len(alive))
        if cfg.split.eval_max is not None:
            n_eval = min(n_eval, cfg.split.eval_max)
        rng = np.random.default_rng([cfg.seed, 1])
        eval_rows = alive[_stratified_eval(labels, n_eval, cfg.split.stratify, rng)]
        # decontamination
        train_rows = np.setdiff1d(alive, eval_rows)
        if len(eval_rows) and len(train_rows):
            t0 = time.perf_counter()
            hit = contaminated(descs[row_of_desc[train_rows]], descs[row_of_desc[eval_rows]],
                               cfg.dedup.decontam_threshold,
                               cfg.dedup.backend, cfg.dedup.ivf_min_size, cfg.dedup.nprobe)
            kind[train_rows[hit]] = "decontaminated"
            log(f"decontamination: {int(hit.sum())} train images match an eval image at cosine >= "
                f"{cfg.dedup.decontam_threshold} ({time.perf_counter() - t0:.1f} s)")
        _save_npz(cache, duplicate_of=duplicate_of, kind=kind.astype(str), eval_rows=eval_rows)
    eval_mask = np.zeros(n, bool)
    eval_mask[eval_rows] = True
    pool_mask = valid & (kind == "") & ~eval_mask
    return Selection(meta, valid, duplicate_of, kind, eval_mask, pool_mask, descs, valid_rows)


# --------------------------------------------------------------------------- step 4: embed, cluster, balance


def _iter_chunk_images(work: WorkDir, n_chunks: int, rows_wanted: np.ndarray) -> Iterator[tuple[int, list[bytes]]]:
    """(chunk id, image bytes of the wanted rows in that chunk), chunk by chunk."""
    wanted = set(rows_wanted.tolist())
    offset = 0
    for i in range(n_chunks):
        table = pq.read_table(work.chunk(i), columns=["image"])
        rows = [r for r in range(table.num_rows) if offset + r in wanted]
        images = table.column("image").take(pa.array(rows, pa.int64())).to_pylist() if rows else []
        yield i, images
        offset += table.num_rows


def embed_pool(cfg: CurateConfig, work: WorkDir, sel: Selection, n_chunks: int,
               embedder: Embedder | None) -> np.ndarray:
    pool_rows = np.flatnonzero(sel.pool_mask)
    e = cfg.embed
    if embedder is None:
        row_of_valid = np.full(len(sel.valid), -1, np.int64)
        row_of_valid[sel.valid_rows] = np.arange(len(sel.valid_rows))
        layouts = np.concatenate([np.load(work.layout(i)) for i in range(n_chunks)])
        log(f"embed: colour-layout embeddings for {len(pool_rows)} images (computed at ingest, no network)")
        return layouts[row_of_valid[pool_rows]].astype(np.float32)
    progress = Progress(f"embed ({e.backbone})", len(pool_rows))
    outs, done = [], 0
    for chunk_id, images in _iter_chunk_images(work, n_chunks, pool_rows):
        path = work.embedding(chunk_id)
        if path.is_file():
            emb = np.load(path)
        else:
            emb = embedder.embed(images) if images else np.zeros((0, embedder.dim), np.float32)
            _save_npy(path, emb.astype(np.float32))
        outs.append(emb)
        done += len(images)
        progress.update(done)
    progress.finish()
    return np.concatenate(outs) if outs else np.zeros((0, embedder.dim), np.float32)


@dataclass
class Balanced:
    pool_rows: np.ndarray   # row of each pool item
    paths: np.ndarray       # [n_pool, L] cluster ids, column 0 = level 1
    selected: np.ndarray    # positions into pool_rows
    levels: list[int]


def cluster_and_balance(cfg: CurateConfig, work: WorkDir, sel: Selection, embeddings: np.ndarray) -> Balanced:
    pool_rows = np.flatnonzero(sel.pool_mask)
    cache = work.root / "cluster.npz"
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
    _save_npz(cache, paths=paths, selected=selected, levels=np.asarray(levels))
    return Balanced(pool_rows, paths, selected, levels)


# --------------------------------------------------------------------------- step 5: write


def _class_names(names: set[str], sources: Sequence[str]) -> list[str]:
    """Label names → class list: numeric order for integer names, else sorted. The shapes world
    keeps its own class order (its segmentation masks store class index + 1)."""
    names = {n for n in names if n}
    first: list[str] = []
    if any(src.startswith("synthetic:") for src in sources):
        from gramline.data.synthetic import CLASSES

        first = list(CLASSES)
    rest = names - set(first)
    if rest and all(n.lstrip("-").isdigit() for n in rest):
        return first + sorted(rest, key=int)
    return first + sorted(rest)


def _cluster_stats(bal: Balanced) -> dict[str, Any]:
    if not len(bal.paths):
        return {"levels": bal.levels}
    top = bal.paths[:, -1]
    k = int(top.max()) + 1
    before = np.bincount(top, minlength=k)
    after = np.bincount(top[bal.selected], minlength=k)
    per_level = {}
    for level in range(bal.paths.shape[1]):
        col = bal.paths[:, level]
        kl = int(col.max()) + 1
        per_level[f"level{level + 1}"] = {
            "before": size_summary(np.bincount(col, minlength=kl)),
            "after": size_summary(np.bincount(col[bal.selected], minlength=kl)),
        }
    return {
        "levels": bal.levels,
        "top_level_sizes_before": before.tolist(),
        "top_level_sizes_after": after.tolist(),
        "summary_before": size_summary(before),
        "summary_after": size_summary(after),
        "per_level": per_level,
    }


def _write_side_tables(out: Path, sel: Selection) -> None:
    meta = sel.meta
    status = np.asarray(meta.column("status").to_pylist(), dtype=object)
    bad = np.flatnonzero(~sel.valid)
    quarantine = pa.table({
        "key": meta.column("key").take(pa.array(bad, pa.int64())),
        "source": meta.column("source").take(pa.array(bad, pa.int64())),
        "location": meta.column("location").take(pa.array(bad, pa.int64())),
        "reason": pa.array(status[bad].tolist(), pa.string()),
        "detail": meta.column("detail").take(pa.array(bad, pa.int64())),
    })
    with atomic_path(out / QUARANTINE) as tmp:
        pq.write_table(quarantine, tmp)
    dup = np.flatnonzero(sel.dup_kind != "")
    keys = meta.column("key").to_numpy(zero_copy_only=False)
    locations = meta.column("location").to_numpy(zero_copy_only=False)
    rep = sel.duplicate_of[dup]
    duplicates = pa.table({
        "key": pa.array(keys[dup].tolist(), pa.string()),
        "location": pa.array(locations[dup].tolist(), pa.string()),
        "kind": pa.array(sel.dup_kind[dup].tolist(), pa.string()),
        "duplicate_of": pa.array([keys[r] if r >= 0 else "" for r in rep], pa.string()),
        "duplicate_of_location": pa.array([locations[r] if r >= 0 else "" for r in rep], pa.string()),
    })
    with atomic_path(out / DUPLICATES) as tmp:
        pq.write_table(duplicates, tmp)


def _funnel(sel: Selection, bal: Balanced) -> dict[str, int]:
    return {
        "seen": len(sel.valid),
        "decoded": int(sel.valid.sum()),
        "quarantined": int((~sel.valid).sum()),
        "exact_duplicates": int((sel.dup_kind == "exact").sum()),
        "near_duplicates": int((sel.dup_kind == "near").sum()),
        "eval": int(sel.eval_mask.sum()),
        "decontaminated": int((sel.dup_kind == "decontaminated").sum()),
        "train_pool": int(sel.pool_mask.sum()),
        "train": len(bal.selected),
        "kept": int(len(bal.selected) + sel.eval_mask.sum()),
    }


def write_dataset(cfg: CurateConfig, work: WorkDir, sel: Selection, bal: Balanced, n_chunks: int,
                  target_dir: Path, inputs: list[dict[str, Any]], timings: dict[str, float]) -> dict[str, Any]:
    """Write shards, index, stats, side tables and the report into `target_dir` (manifest last)."""
    n = len(sel.valid)
    split = np.full(n, "", dtype=object)
    split[sel.eval_mask] = "eval"
    split[bal.pool_rows[bal.selected]] = "train"
    cluster_path = np.full(n, "", dtype=object)
    for pos, row in enumerate(bal.pool_rows):
        cluster_path[row] = "/".join(str(int(v)) for v in bal.paths[pos][::-1])
    root = np.where(sel.duplicate_of >= 0, sel.duplicate_of, np.arange(n))
    while (root != root[root]).any():  # follow chains (exact copy of a near copy of ...)
        root = root[root]
    group_size = np.bincount(root, minlength=n)
    label_names = ["" if v is None else v for v in sel.meta.column("label_name").to_pylist()]
    sources = sorted(set(sel.meta.column("source").to_pylist()))
    classes = _class_names({label_names[r] for r in np.flatnonzero(split != "")}, sources)
    class_index = {name: i for i, name in enumerate(classes)}
    top_k = cfg.output.report_clusters
    top_clusters: list[int] = []
    if len(bal.paths):
        top_sizes = np.bincount(bal.paths[:, -1])
        top_clusters = [int(c) for c in np.argsort(-top_sizes, kind="stable")[:top_k]]
    thumbs: dict[int, list[str]] = {c: [] for c in top_clusters}
    top_of_row = {int(r): int(bal.paths[p, -1]) for p, r in enumerate(bal.pool_rows)} if len(bal.paths) else {}

    funnel = _funnel(sel, bal)
    status = np.asarray(sel.meta.column("status").to_pylist(), dtype=object)
    reasons = {str(r): int(c) for r, c in zip(*np.unique(status[~sel.valid].astype(str), return_counts=True))}
    progress = Progress("write shards", int((split != "").sum()))
    written = 0
    t0 = time.perf_counter()
    with DatasetWriter(target_dir, stage=STAGE, config=dump_config(cfg), inputs=inputs,
                       max_count=cfg.output.max_count, max_bytes=cfg.output.max_bytes, overwrite=True) as writer:
        offset = 0
        for i in range(n_chunks):
            table = pq.read_table(work.chunk(i))
            rows = table.to_pylist()
            for r, rec in enumerate(rows):
                row = offset + r
                if split[row] == "":
                    continue
                label_name = label_names[row]
                writer.add(split[row], ShardSample(
                    key=rec["key"], image=rec["image"], image_ext=rec["image_ext"],
                    label=class_index.get(label_name, -1), label_name=label_name, source=rec["location"],
                    caption=rec["caption"], seg=rec["seg"], cluster=cluster_path[row],
                    width=rec["width"], height=rec["height"],
                    extra={"pixel_sha256": rec["pixel_sha256"], "file_sha256": rec["file_sha256"],
                           "copies": int(group_size[row])},
                ))
                top = top_of_row.get(row)
                if top in thumbs and len(thumbs[top]) < cfg.output.report_thumbs and split[row] == "train":
                    thumbs[top].append(thumbnail_uri(rec["image"]))
                written += 1
                progress.update(written)
            offset += table.num_rows
        progress.finish()
        timings["write_s"] = round(time.perf_counter() - t0, 3)
        _write_side_tables(target_dir, sel)
        clusters = _cluster_stats(bal)
        stats = {
            "funnel": funnel,
            "quarantine": reasons,
            "dedup": {"exact_hash": "sha256 of decoded RGB pixels (+ size)", "threshold": cfg.dedup.threshold,
                      "decontam_threshold": cfg.dedup.decontam_threshold,
                      "descriptor": f"luma 16x16 + chroma 8x8, {_n_views(cfg)} views"},
            "clusters": clusters,
            "embed": {"backbone": cfg.embed.backbone},
            "timings_s": timings,
        }
        grids = []
        if clusters.get("top_level_sizes_before"):
            for c in top_clusters:
                grids.append((str(c), clusters["top_level_sizes_before"][c], clusters["top_level_sizes_after"][c],
                              thumbs[c]))
        write_bytes_atomic(target_dir / REPORT, render_html(stats, grids).encode())
        manifest = writer.close(classes=classes, counts=funnel, stats=stats,
                                extra_manifest={"curation": {"funnel": funnel, "quarantine": reasons}})
    return manifest


def publish_to_s3(staged: Path, out_dir: Path, shards_uri: str) -> dict[str, Any]:
    """Upload staged shards under a temporary prefix, move them into place, then write the
    artifact (manifest with s3:// shard URLs, index, stats, side tables) locally and next to the
    shards, manifest last. A reader that goes by the manifest never sees a partial dataset."""
    manifest = read_manifest(staged, "Dataset", "staged dataset")
    base = shards_uri.rstrip("/")
    token = hashlib.sha256(json.dumps(manifest["shards"], sort_keys=True).encode()).hexdigest()[:12]
    tmp_prefix = f"{base}/_tmp-{token}"
    rels = [rel for rels in manifest["shards"].values() for rel in rels]
    progress = Progress("upload shards", len(rels))
    for i, rel in enumerate(rels):
        s3.upload_file(staged / rel, f"{tmp_prefix}/{rel}")
        progress.update(i + 1)
    for rel in rels:
        s3.copy(f"{tmp_prefix}/{rel}", f"{base}/{rel}")
    s3.delete_prefix(tmp_prefix + "/")
    progress.finish()
    manifest["shards"] = {split: [f"{base}/{rel}" for rel in rels] for split, rels in manifest["shards"].items()}
    manifest["shards_uri"] = base
    index = pq.read_table(staged / INDEX)
    shard_col = pa.array([f"{base}/{rel}" for rel in index.column("shard").to_pylist()], pa.string())
    index = index.set_column(index.schema.get_field_index("shard"), "shard", shard_col)

    if (out_dir / MANIFEST).exists():
        (out_dir / MANIFEST).unlink()
    shutil.rmtree(out_dir / "shards", ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / INDEX) as tmp:
        pq.write_table(index, tmp)
    for name in (STATS, QUARANTINE, DUPLICATES, REPORT):
        write_bytes_atomic(out_dir / name, (staged / name).read_bytes())
    for name in (INDEX, STATS):
        s3.upload_file(out_dir / name, f"{base}/{name}")
    s3.put_bytes(f"{base}/{MANIFEST}", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    write_manifest(out_dir, manifest)
    return manifest


# --------------------------------------------------------------------------- the stage


def curate(source_uris: Sequence[str], cfg: CurateConfig, out_dir: Path) -> dict[str, Any]:
    """Run every step; returns the Dataset manifest."""
    seen: set[str] = set()
    for uri in source_uris:
        if uri in seen:
            raise InputError(f"--source {uri}", "is given twice", "each source once")
        seen.add(uri)
    ing = cfg.ingest
    sources = [open_source(u, ing.folder_labels, ing.path_columns, ing.label_column, ing.caption_column)
               for u in source_uris]
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out-dataset {out_dir}", "exists and is not a directory", "a directory path")
    e = cfg.embed
    embedder = None  # the colour layout is computed during ingest
    if e.backbone != "layout":  # load the model now: a bad one fails before any work
        embedder = build_embedder(e.backbone, e.weights, e.pretrained, e.kwargs, e.img_size, e.batch_size, e.threads)
    plan = {"version": WORK_VERSION, "sources": list(source_uris),
            "config": {k: v for k, v in dump_config(cfg).items() if k != "output"}}
    work = WorkDir(out_dir, plan)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ingest(sources, cfg, work)
    timings["ingest_validate_s"] = round(time.perf_counter() - t0, 3)
    n_chunks = work.done_chunks()
    t0 = time.perf_counter()
    sel = select(cfg, work, n_chunks)
    timings["dedup_split_s"] = round(time.perf_counter() - t0, 3)
    if not sel.valid.any():
        raise InputError("--source " + " ".join(source_uris), "holds no valid image (all were quarantined)",
                         "at least one decodable image")
    t0 = time.perf_counter()
    embeddings = embed_pool(cfg, work, sel, n_chunks, embedder)
    timings["embed_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    bal = cluster_and_balance(cfg, work, sel, embeddings)
    timings["cluster_balance_s"] = round(time.perf_counter() - t0, 3)
    inputs = [{"name": "source", "uri": u} for u in source_uris]
    if cfg.output.shards_uri:
        staged = work.root / "publish"
        write_dataset(cfg, work, sel, bal, n_chunks, staged, inputs, timings)
        manifest = publish_to_s3(staged, out_dir, cfg.output.shards_uri)
    else:
        manifest = write_dataset(cfg, work, sel, bal, n_chunks, out_dir, inputs, timings)
    if not cfg.output.keep_work:
        shutil.rmtree(work.root, ignore_errors=True)
    log(f"done: {manifest['splits']} -> {out_dir}")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = stage_parser(STAGE, "Ingest, validate, deduplicate, cluster-balance and shard an image collection.")
    parser.add_argument("--source", action="append", required=True, metavar="URI",
                        help="dir, .tar, .parquet/.csv manifest, s3://bucket/prefix or synthetic:n=N,size=S,seed=K"
                             " (repeatable)")
    parser.add_argument("--out-dataset", type=Path, required=True, help="output Dataset artifact directory")
    args = parser.parse_args(argv)
    cfg = load_curate_config(args.preset, args.config, args.overrides)
    manifest = curate(args.source, cfg, args.out_dataset)
    shard_bytes = {split: [s3.object_size(u) if s3.is_s3_url(u) else os.path.getsize(args.out_dataset / u)
                           for u in urls] for split, urls in manifest["shards"].items()}
    stats = json.loads((args.out_dataset / STATS).read_text())
    clusters = stats.get("clusters", {})
    metadata = {
        "splits": manifest["splits"],
        "counts": stats["funnel"],
        "quarantine": stats["quarantine"],
        # top-level cluster sizes, largest first (at most 200): the histograms before/after balancing
        "cluster_sizes_before": sorted(clusters.get("top_level_sizes_before", []), reverse=True)[:200],
        "cluster_sizes_after": sorted(clusters.get("top_level_sizes_after", []), reverse=True)[:200],
        "cluster_summary_before": clusters.get("summary_before", {}),
        "cluster_summary_after": clusters.get("summary_after", {}),
        "shard_counts": manifest.get("shard_counts", {}),
        "shard_bytes": shard_bytes,
        "shards_uri": manifest.get("shards_uri", ""),
    }
    emit_executor_output(args, {"dataset": (args.out_dataset, metadata)})
    return 0


def main_cli(argv: Sequence[str] | None = None) -> None:
    run_stage(main, argv)


if __name__ == "__main__":
    main_cli(None)
