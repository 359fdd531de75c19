"""Publishing a staged Dataset artifact with its shards on S3 (`output.shards_uri`).

The shards are uploaded under a temporary prefix, then copied into place; the artifact directory
(manifest with s3:// shard URLs, index, stats, side tables, report) is written locally, and the
index, stats and manifest next to the shards, manifest last. A reader that goes by the manifest
never sees a partial dataset.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from gramline.artifacts import MANIFEST, read_manifest, write_manifest
from gramline.curate.write import DUPLICATES, QUARANTINE, REPORT
from gramline.data import s3
from gramline.data.format import INDEX, SHARDS_DIR, STATS
from gramline.io import atomic_path, write_bytes_atomic
from gramline.progress import Progress


def publish_to_s3(staged: Path, out_dir: Path, shards_uri: str) -> dict[str, Any]:
    """Move the shards of the artifact in `staged` to `shards_uri` and write the artifact, pointing
    at them, into `out_dir`; returns its manifest."""
    manifest = read_manifest(staged, "Dataset", "staged dataset")
    base = shards_uri.rstrip("/")
    token = hashlib.sha256(json.dumps(manifest["shards"], sort_keys=True).encode()).hexdigest()[:12]
    tmp_prefix = f"{base}/_tmp-{token}"
    rels = [rel for rels in manifest["shards"].values() for rel in rels]
    progress = Progress(prefix="curate", what="upload shards", total=len(rels), unit="shards", stream=sys.stderr)
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
    shutil.rmtree(out_dir / SHARDS_DIR, ignore_errors=True)
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
