"""`curate`: the whole curation run, from source URIs to a Dataset artifact.

Steps, in order (one module each):
1. ingest + validate (`ingest`, `sources`, `validate`): every item is decoded, made upright RGB,
   hashed and described; rejects go to `quarantine.parquet` with their reason.
2. exact dedup (sha256 of the decoded pixels), then near-dup (copy descriptor, connected components,
   one representative per component), all recorded in `duplicates.parquet` (`split`, `dedup`).
3. held-out eval split (stratified by label when there are labels), then decontamination: train
   images that match an eval image at `dedup.decontam_threshold` are dropped (`split`).
4. embed the train pool (`embed.backbone`), hierarchical k-means with resampling, balanced
   sampling to `balance.target` (`embed`, `cluster`).
5. shards + index.parquet + stats.json + report.html + manifest.json (last), locally (`write`), or
   with the shards as a new immutable version under `output.shards_uri` (`publish`).

Resumable: every step's results live in the work directory next to the output (`workdir`); a re-run
with the same sources and config continues after the last complete chunk and produces the same
dataset as one clean run, also after S3 stayed unavailable (TransientError, exit 75). The work
directory is removed after success unless `output.keep_work`.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gramline.config import dump_config
from gramline.curate.cluster import cluster_and_balance
from gramline.curate.config import CurateConfig
from gramline.curate.embed import Embedder, build_embedder, embed_pool
from gramline.curate.ingest import ingest
from gramline.curate.log import log
from gramline.curate.publish import publish_to_s3
from gramline.curate.sources import Source, open_source
from gramline.curate.split import select
from gramline.curate.workdir import WorkDir
from gramline.curate.write import write_dataset
from gramline.errors import InputError

WORK_VERSION = 1  # part of the work plan: bump when the work directory's format changes


def _open_sources(source_uris: Sequence[str], cfg: CurateConfig) -> list[Source]:
    seen: set[str] = set()
    for uri in source_uris:
        if uri in seen:
            raise InputError(f"--source {uri}", "is given twice", "each source once")
        seen.add(uri)
    ing = cfg.ingest
    return [open_source(u, ing.folder_labels, ing.path_columns, ing.label_column, ing.caption_column)
            for u in source_uris]


def _embedder(cfg: CurateConfig) -> Embedder | None:
    """The network embedder, loaded up front so that a bad model fails before any work; None for
    the colour layout, which ingest computes."""
    e = cfg.embed
    if e.backbone == "layout":
        return None
    return build_embedder(e.backbone, e.weights, e.pretrained, e.kwargs, e.img_size, e.batch_size, e.threads)


def curate(source_uris: Sequence[str], cfg: CurateConfig, out_dir: Path) -> dict[str, Any]:
    """Curate the images of `source_uris` into the Dataset artifact `out_dir`; returns its manifest.
    A bad source, output path or embedder is an InputError raised before any work."""
    sources = _open_sources(source_uris, cfg)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out-dataset {out_dir}", "exists and is not a directory", "a directory path")
    embedder = _embedder(cfg)
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
    embeddings = embed_pool(work, sel, n_chunks, embedder)
    timings["embed_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    bal = cluster_and_balance(cfg, work, sel, embeddings)
    timings["cluster_balance_s"] = round(time.perf_counter() - t0, 3)
    inputs = [{"name": "source", "uri": u} for u in source_uris]
    if cfg.output.shards_uri:
        write_dataset(cfg, work, sel, bal, n_chunks, work.staged, inputs, timings)
        manifest = publish_to_s3(work.staged, out_dir, cfg.output.shards_uri, work.pending_publish)
    else:
        manifest = write_dataset(cfg, work, sel, bal, n_chunks, out_dir, inputs, timings)
    if not cfg.output.keep_work:
        shutil.rmtree(work.root, ignore_errors=True)
    log(f"done: {manifest['splits']} -> {out_dir}")
    return manifest
