"""`curate`: the whole curation run, from source URIs to a Dataset artifact.

Steps, in order (one module each):
0. plan (`partition`): the sources' items, cut into partitions of a global item order.
1. ingest + validate, per partition (`ingest`, `sources`, `validate`): every item is decoded, made
   upright RGB, hashed and described; rejects go to `quarantine.parquet` with their reason.
   Then the reduce, over all partitions' chunks in order:
2. exact dedup (sha256 of the decoded pixels), then near-dup (copy descriptor, connected components,
   one representative per component), all recorded in `duplicates.parquet` (`split`, `dedup`).
3. held-out eval split (stratified by label when there are labels), then decontamination: train
   images that match an eval image at `dedup.decontam_threshold` are dropped (`split`).
4. embed the train pool (`embed.backbone`), hierarchical k-means with resampling, balanced
   sampling to `balance.target` (`embed`, `cluster`).
5. shards + index.parquet + stats.json + report.html + manifest.json (last), locally (`write`), or
   with the shards as a new immutable version under `output.shards_uri` (`publish`).

`curate` runs it all in one process; the pipeline runs `plan`, then `run_partition` once per
partition (a KFP ParallelFor), then `reduce` on the collected partition outputs: the same code, so
the same dataset. The network embedding stays in the reduce: it embeds only the train pool left
after dedup and decontamination, and loads the model once (on the GPU), while the partitions need
CPUs only.

Resumable: a partition's chunks and, last, its manifest are written atomically, so a re-run
continues after the last complete chunk and skips complete partitions; the reduce caches its
dedup/split and cluster results in the work directory (`workdir`) next to the output, or under
`partition.work_root` in the pipeline. A re-run with the same sources and config produces the same
dataset as one clean run, also after S3 stayed unavailable (TransientError, exit 75). The work
directory is removed after success unless `output.keep_work`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gramline.config import dump_config
from gramline.curate.cluster import cluster_and_balance
from gramline.curate.config import CurateConfig
from gramline.curate.embed import Embedder, build_embedder, embed_pool
from gramline.curate.ingest import ingest_partition
from gramline.curate.log import log
from gramline.curate.partition import (
    Partition,
    Plan,
    check_complete,
    check_counts,
    embeds_in_partitions,
    make_plan,
    stored_partition,
)
from gramline.curate.publish import publish_to_s3
from gramline.curate.sources import Source, open_source
from gramline.curate.split import select
from gramline.curate.workdir import PartDir, WorkDir
from gramline.curate.write import write_dataset
from gramline.errors import InputError
from gramline.io import link_or_copy

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
    return build_embedder(e.backbone, e.weights, e.pretrained, e.kwargs, e.img_size, e.batch_size, e.threads,
                          e.device, e.workers)


def _reduce_plan(plan_id: str, cfg: CurateConfig) -> dict[str, Any]:
    config = {k: v for k, v in dump_config(cfg).items() if k not in ("output", "partition")}
    return {"version": WORK_VERSION, "plan_id": plan_id, "config": config}


def plan(source_uris: Sequence[str], cfg: CurateConfig) -> Plan:
    """Check the sources and cut their items into partitions."""
    return make_plan(source_uris, _open_sources(source_uris, cfg), cfg)


def run_partition(source_uris: Sequence[str], cfg: CurateConfig, partition: Partition, out: Path) -> dict[str, Any]:
    """Ingest `partition` into the directory `out` (a partition output artifact); returns its
    manifest. With `partition.work_root` the work happens there (kept by plan id across runs, a
    complete partition is skipped) and `out` receives a hard-linked copy."""
    sources = _open_sources(source_uris, cfg)
    check_counts(sources, partition)
    embedder = _embedder(cfg) if embeds_in_partitions(cfg) else None
    if cfg.partition.work_root is None:
        return ingest_partition(sources, partition.counts, partition, cfg, PartDir(out), embedder)
    stored = PartDir(stored_partition(cfg.partition.work_root, partition))
    manifest = ingest_partition(sources, partition.counts, partition, cfg, stored, embedder)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(stored.root, out, copy_function=link_or_copy)
    return manifest


def _reduce(source_uris: Sequence[str], cfg: CurateConfig, parts: list[PartDir], chunks: list[int],
            out_dir: Path, work: WorkDir, embedder: Embedder | None, timings: dict[str, float]) -> dict[str, Any]:
    work.attach(parts, chunks)
    n_chunks = work.done_chunks()
    t0 = time.perf_counter()
    sel = select(cfg, work, n_chunks)
    timings["dedup_split_s"] = round(time.perf_counter() - t0, 3)
    if not sel.valid.any():
        raise InputError("--source " + " ".join(source_uris), "holds no valid image (all were quarantined)",
                         "at least one decodable image")
    t0 = time.perf_counter()
    embeddings = embed_pool(work, sel, n_chunks, embedder, cfg.embed.backbone if embeds_in_partitions(cfg) else None)
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
    log(f"done: {manifest['splits']} -> {out_dir}")
    return manifest


def _check_out(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out-dataset {out_dir}", "exists and is not a directory", "a directory path")


def _partition_roots(roots: Sequence[Path]) -> list[Path]:
    """`roots`, where a directory holding `part-*` directories (a plan's directory under
    `partition.work_root`, as `gramline rerun curate --input parts=DIR` passes it) stands for them."""
    found: list[Path] = []
    for root in map(Path, roots):
        inside = sorted(p for p in root.glob("part-*") if p.is_dir())
        found += inside if inside and not (root / "manifest.json").is_file() else [root]
    return found


def reduce(source_uris: Sequence[str], cfg: CurateConfig, part_roots: Sequence[Path], out_dir: Path) -> dict[str, Any]:
    """Dedup, split, cluster, balance and write the Dataset from the partition outputs `part_roots`
    (any order; together every partition of one plan; or the directory holding them); returns its
    manifest."""
    _check_out(out_dir)
    parts = [PartDir(root) for root in _partition_roots(part_roots)]
    manifests = []
    for part in parts:
        if not part.manifest.is_file():
            raise InputError(f"partition output {part.root}", "has no manifest.json (incomplete)",
                             "the output of a partition that finished")
        manifests.append({**json.loads(part.manifest.read_text()), "root": str(part.root)})
    ordered = check_complete(manifests)
    if embeds_in_partitions(cfg):  # the partitions embedded: no model here
        embedder = None
        for m in ordered:
            if m.get("embedded") != cfg.embed.backbone:
                raise InputError(f"partition output {m['root']}", f"holds no {cfg.embed.backbone} embeddings "
                                 f"(embedded: {m.get('embedded')})", "partitions made with embed.where=partitions "
                                 "and the reduce's embed settings")
    else:
        embedder = _embedder(cfg)
    plan_id = str(ordered[0]["plan_id"])
    keep = cfg.partition.work_root
    root = Path(keep) / f"plan-{plan_id}" / "reduce" if keep else None
    work = WorkDir(out_dir, _reduce_plan(plan_id, cfg), root)
    log(f"reduce: {len(ordered)} partition(s) of plan {plan_id}")
    manifest = _reduce(source_uris, cfg, [PartDir(Path(m["root"])) for m in ordered],
                       [int(m["chunks"]) for m in ordered], out_dir, work, embedder, {})
    if not cfg.output.keep_work:
        shutil.rmtree(work.root.parent if keep else work.root, ignore_errors=True)
    return manifest


def curate(source_uris: Sequence[str], cfg: CurateConfig, out_dir: Path) -> dict[str, Any]:
    """Curate the images of `source_uris` into the Dataset artifact `out_dir` in this process (plan,
    every partition, reduce); returns its manifest. A bad source, output path or embedder is an
    InputError raised before any work."""
    sources = _open_sources(source_uris, cfg)
    _check_out(out_dir)
    embedder = _embedder(cfg)
    the_plan = make_plan(source_uris, sources, cfg)
    work = WorkDir(out_dir, _reduce_plan(the_plan.plan_id, cfg))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    n = len(the_plan.partitions)
    parts = [work.partition_dir(p.index, n) for p in the_plan.partitions]
    in_parts = embedder if embeds_in_partitions(cfg) else None
    done = [ingest_partition(sources, the_plan.counts, p, cfg, part, in_parts)
            for p, part in zip(the_plan.partitions, parts)]
    timings["ingest_validate_s"] = round(time.perf_counter() - t0, 3)
    skipped = sum(m["skipped"] for m in done)
    if skipped:
        log(f"ingest: {skipped} of {n} partition(s) were complete already")
    manifest = _reduce(source_uris, cfg, parts, [int(m["chunks"]) for m in done], out_dir, work, embedder, timings)
    if not cfg.output.keep_work:
        shutil.rmtree(work.root, ignore_errors=True)
    return manifest
