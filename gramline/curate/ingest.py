"""Step 1, ingest + validate: every item of one partition (a piece of the sources' global item order,
gramline.curate.partition) is loaded, decoded, made upright RGB, hashed and described, on a thread
pool, into resumable work chunks of `ingest.chunk_size` items; `manifest.json`, written last, marks
the partition complete, and a re-run skips a complete partition.

Rejected items keep a row with their reason (they become `quarantine.parquet`); valid ones also get
their copy-detection views (for dedup) and colour layout (the offline clustering embedding). Only a
permanent load failure (missing, forbidden, undecodable bytes) quarantines an item; a source that
stays unreachable after the S3 retries (TransientError) stops the run with the chunk unwritten, so a
re-run reads it again.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import io
import itertools
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from gramline.curate.config import CurateConfig
from gramline.curate.dedup import DESCRIPTOR_DIM, descriptor_views, view_count
from gramline.curate.embed import LAYOUT_DIM, Embedder, colour_layout, embed_part
from gramline.curate.log import log
from gramline.curate.partition import Partition
from gramline.curate.sources import Item, ShardSetSource, Source, TarSource
from gramline.curate.validate import Rejection, validate_image
from gramline.curate.workdir import CHUNK_SCHEMA, PartDir, save_npy
from gramline.errors import InputError
from gramline.io import atomic_path, remove_stale_temps, write_json_atomic
from gramline.progress import Progress


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
    except (OSError, InputError) as err:  # permanent (missing, forbidden); a TransientError stops the run
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


def _run_all(pool: concurrent.futures.Executor, calls: list[Callable[[], _Processed]]) -> list[_Processed]:
    """Results in order; the first failure cancels the calls not yet started and is raised."""
    futures = [pool.submit(call) for call in calls]
    try:
        return [f.result() for f in futures]
    except BaseException:
        for f in futures:
            f.cancel()
        raise


def _range_items(sources: Sequence[Source], counts: Sequence[int], start: int, stop: int
                 ) -> Iterator[tuple[int, Item, set[str]]]:
    """(global idx, item, keys taken before it in its source) for items [start, stop). Sources
    wholly before `start` are not listed; a tar stream is read from its beginning (it cannot seek),
    and its earlier keys are remembered, since only a tar can repeat a reference."""
    offset = 0
    for source, count in zip(sources, counts):
        if offset + count <= start or offset >= stop:
            offset += count
            continue
        keys: set[str] = set()
        repeats = isinstance(source, TarSource)
        end = min(stop, offset + count)
        listed = 0
        for item in source.items():
            idx = offset + listed
            if idx >= end:
                break
            listed += 1
            if idx < start:
                if repeats:
                    _unique_key(item, keys)
                continue
            yield idx, item, keys
        if offset + listed < end:
            raise InputError(f"--source {source.uri}", f"lists fewer items than the {count} the plan counted",
                             "sources that do not change while they are curated")
        offset += count


def _partition_items(sources: Sequence[Source], counts: Sequence[int], partition: Partition, skip: int
                     ) -> Iterator[tuple[int, Item, set[str]]]:
    """(idx, item, keys taken before it in its tar) for the items of `partition` after its first
    `skip`: an idx range of the counted sources, or the items of a shard set's shards [start, stop),
    numbered from 0 within the partition."""
    if partition.shard_set < 0:
        counted = [(source, count) for source, count in zip(sources, counts) if not isinstance(source, ShardSetSource)]
        yield from _range_items([s for s, _ in counted], [c for _, c in counted], partition.start + skip,
                                partition.stop)
        return
    keys: set[str] = set()  # a key repeats only inside one shard (references are <shard>/<member>)
    shards = sources[partition.shard_set]
    assert isinstance(shards, ShardSetSource)
    for idx, item in enumerate(shards.items(partition.start, partition.stop)):
        if idx < skip:
            _unique_key(item, keys)
            continue
        yield idx, item, keys


def _unique_key(item: Item, keys: set[str]) -> str:
    key, n = item.key, 1
    while key in keys:  # the same reference twice (e.g. a repeated tar member)
        key = hashlib.sha1(f"{item.source}\0{item.ref}\0{n}".encode()).hexdigest()[:20]
        n += 1
    keys.add(key)
    return key


def _seen_keys(part: PartDir, n_chunks: int) -> set[str]:
    keys: set[str] = set()
    for i in range(n_chunks):
        keys.update(pq.read_table(part.chunk(i), columns=["key"]).column("key").to_pylist())
    return keys


def _write_chunk(part: PartDir, chunk_id: int, done: list[_Processed], cfg: CurateConfig) -> None:
    descs = [p.desc for p in done if p.desc is not None]
    no_desc = np.zeros((0, view_count(cfg.dedup.view_grid), DESCRIPTOR_DIM), np.float16)
    desc = np.stack(descs) if descs else no_desc
    layouts = [p.layout for p in done if p.layout is not None]
    layout = np.stack(layouts) if layouts else np.zeros((0, LAYOUT_DIM), np.float16)
    # arrays first: the parquet, written last, marks the chunk complete
    save_npy(part.desc(chunk_id), desc)
    save_npy(part.layout(chunk_id), layout)
    table = pa.Table.from_pylist([p.row for p in done], schema=CHUNK_SCHEMA)
    with atomic_path(part.chunk(chunk_id)) as tmp:
        pq.write_table(table, tmp)


def _prepare(part: PartDir, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest when `part` already holds this partition complete; else make it ready to
    (re)start: a directory of another partition or plan is emptied."""
    if part.spec.is_file():
        try:
            same = json.loads(part.spec.read_text()) == spec
        except ValueError:
            same = False
        if same and part.manifest.is_file():
            return dict(json.loads(part.manifest.read_text()))
        if not same:
            log(f"partition directory {part.root} holds another partition or plan: starting it afresh")
            shutil.rmtree(part.root)
    part.root.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(part.root)
    if not part.spec.is_file():
        write_json_atomic(part.spec, spec)
    return None


def ingest_partition(sources: Sequence[Source], counts: Sequence[int], partition: Partition, cfg: CurateConfig,
                     part: PartDir, embedder: Embedder | None = None) -> dict[str, Any]:
    """Load, validate and describe the items of `partition` into `part`, and with `embedder` embed
    its valid images (embed.where=partitions); returns its manifest (`skipped`: true when it was
    already complete)."""
    spec = partition.to_json()
    done_before = _prepare(part, spec)
    if done_before is not None:
        log(f"ingest: partition {partition.index} already complete ({done_before['items']} items), skipping")
        return {**done_before, "skipped": True}
    size = cfg.ingest.chunk_size
    n_done = part.done_chunks()
    if n_done:
        log(f"ingest: resuming after {n_done} complete chunk(s) ({n_done * size} items)")
    keys = _seen_keys(part, n_done)
    workers = cfg.ingest.workers or os.cpu_count() or 1
    what = "ingest+validate" + (f" [{partition.index}]" if partition.of > 1 else "")
    base = partition.start if partition.shard_set < 0 else 0  # idx of the partition's first item
    progress = Progress(prefix="curate", what=what, unit="img", stream=sys.stderr, start_at=n_done * size,
                        total=partition.stop - partition.start if partition.shard_set < 0 else None)
    counted = {"ok": 0, "quarantined": 0}
    items = _partition_items(sources, counts, partition, n_done * size)
    chunk_id = n_done
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        while batch := list(itertools.islice(items, size)):
            jobs = []
            for idx, item, earlier in batch:
                key = item.key
                if key in keys or key in earlier:
                    keys.update(earlier)
                    key = _unique_key(item, keys)
                keys.add(key)
                earlier.add(key)
                jobs.append((idx, key, item))
            done = _run_all(pool, [functools.partial(_process, idx, key, item, cfg) for idx, key, item in jobs])
            _write_chunk(part, chunk_id, done, cfg)
            ok = sum(p.desc is not None for p in done)
            counted["ok"] += ok
            counted["quarantined"] += len(done) - ok
            chunk_id += 1
            progress.update(jobs[-1][0] + 1 - base, counted)
    progress.finish(counted)
    if embedder is not None:
        embed_part(part, chunk_id, embedder, f" [{partition.index}]" if partition.of > 1 else "")
    n_items = sum(pq.read_metadata(part.chunk(i)).num_rows for i in range(chunk_id))
    manifest = {**spec, "chunks": chunk_id, "items": n_items, "embedded": embedder.name if embedder else None}
    write_json_atomic(part.manifest, manifest)  # last: the partition is complete
    return {**manifest, "skipped": False}
