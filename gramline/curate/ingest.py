"""Step 1, ingest + validate: every item of every source is loaded, decoded, made upright RGB,
hashed and described, on a thread pool, into resumable work chunks of `ingest.chunk_size` items.

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
from gramline.curate.embed import LAYOUT_DIM, colour_layout
from gramline.curate.log import log
from gramline.curate.sources import Item, Source
from gramline.curate.validate import Rejection, validate_image
from gramline.curate.workdir import CHUNK_SCHEMA, WorkDir, save_npy
from gramline.errors import InputError
from gramline.io import atomic_path, write_json_atomic
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


def _all_items(sources: Sequence[Source]) -> Iterator[Item]:
    for source in sources:
        yield from source.items()


def _seen_keys(work: WorkDir, n_chunks: int) -> set[str]:
    keys: set[str] = set()
    for i in range(n_chunks):
        keys.update(pq.read_table(work.chunk(i), columns=["key"]).column("key").to_pylist())
    return keys


def _write_chunk(work: WorkDir, chunk_id: int, done: list[_Processed], cfg: CurateConfig) -> None:
    descs = [p.desc for p in done if p.desc is not None]
    no_desc = np.zeros((0, view_count(cfg.dedup.view_grid), DESCRIPTOR_DIM), np.float16)
    desc = np.stack(descs) if descs else no_desc
    layouts = [p.layout for p in done if p.layout is not None]
    layout = np.stack(layouts) if layouts else np.zeros((0, LAYOUT_DIM), np.float16)
    # arrays first: the parquet, written last, marks the chunk complete
    save_npy(work.desc(chunk_id), desc)
    save_npy(work.layout(chunk_id), layout)
    table = pa.Table.from_pylist([p.row for p in done], schema=CHUNK_SCHEMA)
    with atomic_path(work.chunk(chunk_id)) as tmp:
        pq.write_table(table, tmp)


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
    progress = Progress(prefix="curate", what="ingest+validate", total=total_hint, unit="img", stream=sys.stderr,
                        start_at=start)
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
            done = _run_all(pool, [functools.partial(_process, idx, key, item, cfg) for idx, key, item in jobs])
            _write_chunk(work, chunk_id, done, cfg)
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
