"""Step 5, write: the curated Dataset artifact (gramline.data.writer.DatasetWriter) in one directory.

    shards/...             WebDataset tar shards of the train and eval splits
    index.parquet          one row per sample (DatasetWriter)
    stats.json             funnel, quarantine reasons, dedup settings, cluster sizes, timings
    quarantine.parquet     every rejected input with its reason and detail
    duplicates.parquet     every dropped duplicate (exact, near, decontaminated) and what it copies
    report.html            the summary page (gramline.curate.report)
    manifest.json          written last, after every shard is complete

Samples keep their ingest order; each carries its cluster path ("top/.../leaf"), its label index
(`_class_names`) and the size of its duplicate group ("copies").
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gramline.config import dump_config
from gramline.curate.cluster import Balanced, size_summary
from gramline.curate.config import CurateConfig
from gramline.curate.dedup import view_count
from gramline.curate.report import render_html, thumbnail_uri
from gramline.curate.split import Selection
from gramline.curate.workdir import WorkDir
from gramline.data.writer import DatasetWriter, ShardSample
from gramline.io import atomic_path, write_bytes_atomic
from gramline.progress import Progress

QUARANTINE = "quarantine.parquet"
DUPLICATES = "duplicates.parquet"
REPORT = "report.html"


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
    bad = pa.array(np.flatnonzero(~sel.valid), pa.int64())
    quarantine = pa.table({
        "key": meta.column("key").take(bad),
        "source": meta.column("source").take(bad),
        "location": meta.column("location").take(bad),
        "reason": pa.array(status[~sel.valid].tolist(), pa.string()),
        "detail": meta.column("detail").take(bad),
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


def _split_of_rows(sel: Selection, bal: Balanced) -> np.ndarray:
    """Per row: "train", "eval" or "" (not written)."""
    split = np.full(len(sel.valid), "", dtype=object)
    split[sel.eval_mask] = "eval"
    split[bal.pool_rows[bal.selected]] = "train"
    return split


def _cluster_path_of_rows(n: int, bal: Balanced) -> np.ndarray:
    """Per row: the cluster path from the top level down ("top/.../leaf"), "" outside the pool."""
    cluster_path = np.full(n, "", dtype=object)
    for pos, row in enumerate(bal.pool_rows):
        cluster_path[row] = "/".join(str(int(v)) for v in bal.paths[pos][::-1])
    return cluster_path


def _copies_of_rows(sel: Selection) -> np.ndarray:
    """Per row: how many rows (itself included) have it as their final representative; 1 for a
    unique image, 0 for a dropped duplicate."""
    n = len(sel.valid)
    root = np.where(sel.duplicate_of >= 0, sel.duplicate_of, np.arange(n))
    while (root != root[root]).any():  # follow chains (exact copy of a near copy of ...)
        root = root[root]
    return np.bincount(root, minlength=n)


def _largest_top_clusters(bal: Balanced, k: int) -> list[int]:
    if not len(bal.paths):
        return []
    return [int(c) for c in np.argsort(-np.bincount(bal.paths[:, -1]), kind="stable")[:k]]


def write_dataset(cfg: CurateConfig, work: WorkDir, sel: Selection, bal: Balanced, n_chunks: int,
                  target_dir: Path, inputs: list[dict[str, Any]], timings: dict[str, float]) -> dict[str, Any]:
    """Write shards, index, stats, side tables and the report into `target_dir` (manifest last);
    adds `write_s` to `timings`. Returns the manifest."""
    n = len(sel.valid)
    split = _split_of_rows(sel, bal)
    cluster_path = _cluster_path_of_rows(n, bal)
    copies = _copies_of_rows(sel)
    label_names = ["" if v is None else v for v in sel.meta.column("label_name").to_pylist()]
    sources = sorted(set(sel.meta.column("source").to_pylist()))
    classes = _class_names({label_names[r] for r in np.flatnonzero(split != "")}, sources)
    class_index = {name: i for i, name in enumerate(classes)}
    top_clusters = _largest_top_clusters(bal, cfg.output.report_clusters)
    thumbs: dict[int, list[str]] = {c: [] for c in top_clusters}
    top_of_row = {int(r): int(bal.paths[p, -1]) for p, r in enumerate(bal.pool_rows)} if len(bal.paths) else {}

    funnel = _funnel(sel, bal)
    status = np.asarray(sel.meta.column("status").to_pylist(), dtype=object)
    reasons = {str(r): int(c) for r, c in zip(*np.unique(status[~sel.valid].astype(str), return_counts=True))}
    progress = Progress(prefix="curate", what="write shards", total=int((split != "").sum()), unit="img",
                        stream=sys.stderr)
    written = 0
    t0 = time.perf_counter()
    with DatasetWriter(target_dir, stage="curate", config=dump_config(cfg), inputs=inputs,
                       max_count=cfg.output.max_count, max_bytes=cfg.output.max_bytes, overwrite=True) as writer:
        offset = 0
        for i in range(n_chunks):
            table = pq.read_table(work.chunk(i))
            for r, rec in enumerate(table.to_pylist()):
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
                           "copies": int(copies[row])},
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
                      "descriptor": f"luma 16x16 + chroma 8x8, {view_count(cfg.dedup.view_grid)} views"},
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
