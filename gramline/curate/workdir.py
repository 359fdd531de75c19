"""The resumable work directory of a curation run, its partition directories, and the format of
their ingest chunks.

The work lives next to the output (`.<out>.curate-work/`), or under `partition.work_root` in the
partitioned pipeline (gramline.curate.partition). Every file in it is written atomically,
so a killed run leaves only complete files (plus temp names, removed on the next start); a re-run
with the same plan (sources and config) continues from what is there, a different plan starts
afresh. Layout:

    plan.json                     digest of the plan (plan id, config without `output`)
    ingest/                       the one partition's directory (PartDir) when the plan has one,
    ingest/part-NNNNN/            else one per partition:
        partition.json            the partition (index, item range, plan id), written first
        chunk-NNNNNN.parquet      one row per item (CHUNK_SCHEMA); written last, marks the chunk done
        chunk-NNNNNN.desc.npy     copy-detection views of the chunk's valid images (dedup)
        chunk-NNNNNN.layout.npy   colour layouts of the chunk's valid images (the "layout" embedding)
        chunk-NNNNNN.emb.npy      network embeddings of the chunk's valid images (embed.where=partitions)
        manifest.json             the partition is complete (written last)
    dedup.npz, cluster.npz        results of the dedup/split and the cluster/balance steps
    embed/emb-NNNNNN.npy          network embeddings of the pool images in (global) chunk NNNNNN
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


class PartDir:
    """One partition's ingest output: chunks, then `manifest.json` last (complete)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def chunk(self, i: int) -> Path:
        return self.root / f"chunk-{i:06d}.parquet"

    def desc(self, i: int) -> Path:
        return self.root / f"chunk-{i:06d}.desc.npy"

    def layout(self, i: int) -> Path:
        return self.root / f"chunk-{i:06d}.layout.npy"

    def embedding(self, i: int) -> Path:
        return self.root / f"chunk-{i:06d}.emb.npy"

    def done_chunks(self) -> int:
        n = 0
        while self.chunk(n).is_file():
            n += 1
        return n

    @property
    def spec(self) -> Path:
        return self.root / "partition.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"


class WorkDir:
    """Intermediate results of the reduce steps, over the chunks of the attached partitions;
    a different plan (plan id, config) starts afresh. `root` defaults to `.<out>.curate-work`."""

    def __init__(self, out_dir: Path, plan: dict[str, Any], root: Path | None = None) -> None:
        self.root = root if root is not None else out_dir.parent / f".{out_dir.name}.curate-work"
        self._chunks: list[tuple[PartDir, int]] = []
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
        (self.root / "embed").mkdir(parents=True, exist_ok=True)
        for sub in (self.root, self.root / "embed"):
            remove_stale_temps(sub)  # temp names of writes a kill interrupted
        if not plan_file.is_file():
            write_json_atomic(plan_file, {"digest": digest, **plan})

    def partition_dir(self, index: int, n_partitions: int) -> PartDir:
        """Where the single-process path ingests partition `index`."""
        root = self.root / "ingest"
        return PartDir(root if n_partitions == 1 else root / f"part-{index:05d}")

    def attach(self, parts: list[PartDir], chunks: list[int]) -> None:
        """Number the chunks of `parts` (in order; `chunks[k]` of part k) globally from 0."""
        self._chunks = [(part, i) for part, n in zip(parts, chunks) for i in range(n)]

    def chunk(self, i: int) -> Path:
        part, local = self._chunks[i]
        return part.chunk(local)

    def desc(self, i: int) -> Path:
        part, local = self._chunks[i]
        return part.desc(local)

    def layout(self, i: int) -> Path:
        part, local = self._chunks[i]
        return part.layout(local)

    def partition_embedding(self, i: int) -> Path:
        part, local = self._chunks[i]
        return part.embedding(local)

    def embedding(self, i: int) -> Path:
        return self.root / "embed" / f"emb-{i:06d}.npy"

    def done_chunks(self) -> int:
        return len(self._chunks)

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
