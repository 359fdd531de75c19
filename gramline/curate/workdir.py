"""The resumable work directory of a curation run, and the format of its ingest chunks.

The work lives next to the output (`.<out>.curate-work/`). Every file in it is written atomically,
so a killed run leaves only complete files (plus temp names, removed on the next start); a re-run
with the same plan (sources and config) continues from what is there, a different plan starts
afresh. Layout:

    plan.json                     digest of the plan (sources, config without `output`)
    ingest/chunk-NNNNNN.parquet   one row per item (CHUNK_SCHEMA); written last, marks the chunk done
    ingest/chunk-NNNNNN.desc.npy  copy-detection views of the chunk's valid images (dedup)
    ingest/chunk-NNNNNN.layout.npy  colour layouts of the chunk's valid images (the "layout" embedding)
    ingest/done.json              ingest finished: total item count
    dedup.npz, cluster.npz        results of the dedup/split and the cluster/balance steps
    embed/emb-NNNNNN.npy          network embeddings of the pool images in ingest chunk NNNNNN
    publish/                      the artifact staged for upload when shards go to S3
    publish.json                  the S3 version being published (removed by a re-run if unfinished)
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from gramline.curate.log import log
from gramline.io import atomic_path, remove_stale_temps, write_bytes_atomic, write_json_atomic

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


class WorkDir:
    """Intermediate results next to the output; a different plan (sources/config) starts afresh."""

    def __init__(self, out_dir: Path, plan: dict[str, Any]) -> None:
        self.root = out_dir.parent / f".{out_dir.name}.curate-work"
        digest = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
        plan_file = self.root / "plan.json"
        if plan_file.is_file():
            try:
                same = json.loads(plan_file.read_text()).get("digest") == digest
            except ValueError:
                same = False
            if not same:
                log(f"work directory {self.root} is from other sources or config: starting afresh")
                pending = self.pending_publish.read_bytes() if self.pending_publish.is_file() else None
                shutil.rmtree(self.root)
                if pending is not None:  # an unfinished S3 publish: the next publish still removes it
                    self.root.mkdir(parents=True)
                    write_bytes_atomic(self.pending_publish, pending)
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

    @property
    def dedup_cache(self) -> Path:
        return self.root / "dedup.npz"

    @property
    def cluster_cache(self) -> Path:
        return self.root / "cluster.npz"

    @property
    def staged(self) -> Path:
        return self.root / "publish"

    @property
    def pending_publish(self) -> Path:
        return self.root / "publish.json"


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def save_npz(path: Path, **arrays: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
