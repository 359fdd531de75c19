"""Publishing a staged Dataset artifact to S3 (`output.shards_uri`) as a new, immutable version.

Layout under the base `s3://bucket/prefix` (a folder: `prefix/`):

    prefix/versions/<version>/shards/*.tar      the WebDataset shards
    prefix/versions/<version>/index.parquet     its `shard` column holds the full s3:// URLs
    prefix/versions/<version>/stats.json
    prefix/versions/<version>/manifest.json     written last: the version exists once this does
    prefix/latest.json                          {"version", "manifest"} of the last publish, written after

`<version>` is the UTC time of the publish and a random suffix (`20261206T131903Z-9c1e2f3a`), so a
publish, concurrent ones included, only ever writes keys that nobody else writes, and no object a
manifest names is ever rewritten: a published dataset stays byte-identical for as long as it exists.
The local artifact `out_dir` gets the same manifest (shard URLs are absolute), index and stats, plus
the side tables and report.

A publish that fails deletes its version, manifest first (so no manifest ever names a deleted
shard). The version is recorded in the work directory before the first upload, so a re-run also
removes what a killed run left, unless `latest.json` already names it.
"""

from __future__ import annotations

import io
import json
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from gramline.artifacts import MANIFEST, read_manifest, write_manifest
from gramline.curate.log import log
from gramline.curate.write import DUPLICATES, QUARANTINE, REPORT
from gramline.data import s3
from gramline.data.format import INDEX, SHARDS_DIR, STATS
from gramline.errors import InputError, TransientError
from gramline.io import write_bytes_atomic, write_json_atomic
from gramline.progress import Progress

VERSIONS = "versions"
LATEST = "latest.json"


def new_version() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


def publish_to_s3(staged: Path, out_dir: Path, shards_uri: str, pending: Path) -> dict[str, Any]:
    """Upload the artifact staged in `staged` as a new version under `shards_uri` and write the
    artifact, pointing at it, into `out_dir`; returns its manifest. `pending` (in the work
    directory) records the version until the publish is complete."""
    base = shards_uri.rstrip("/")
    discard_pending(pending)
    version = new_version()
    root = f"{base}/{VERSIONS}/{version}"
    write_json_atomic(pending, {"base": base, "version": version})
    try:
        manifest, index = _upload(staged, root)
        s3.put_bytes(f"{base}/{LATEST}", _json({"version": version, "manifest": f"{root}/{MANIFEST}"}))
    except BaseException:
        try:
            _discard(base, version)
        except (TransientError, InputError) as err:
            log(f"publish: could not remove the failed version {root} ({err}); the next run removes it")
        raise
    pending.unlink()

    if (out_dir / MANIFEST).exists():
        (out_dir / MANIFEST).unlink()
    shutil.rmtree(out_dir / SHARDS_DIR, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out_dir / INDEX, index)
    for name in (STATS, QUARANTINE, DUPLICATES, REPORT):
        write_bytes_atomic(out_dir / name, (staged / name).read_bytes())
    write_manifest(out_dir, manifest)
    return manifest


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _upload(staged: Path, root: str) -> tuple[dict[str, Any], bytes]:
    """Shards, index and stats, then the manifest; returns the manifest and the index bytes."""
    manifest = read_manifest(staged, "Dataset", "staged dataset")
    rels = [rel for rels in manifest["shards"].values() for rel in rels]
    progress = Progress(prefix="curate", what="upload shards", total=len(rels), unit="shards", stream=sys.stderr)
    for i, rel in enumerate(rels):
        s3.upload_file(staged / rel, f"{root}/{rel}")
        progress.update(i + 1)
    progress.finish()
    manifest["shard_bytes"] = {split: [(staged / rel).stat().st_size for rel in rels]
                               for split, rels in manifest["shards"].items()}
    manifest["shards"] = {split: [f"{root}/{rel}" for rel in rels] for split, rels in manifest["shards"].items()}
    manifest["shards_uri"] = root
    table = pq.read_table(staged / INDEX)
    shard_col = pa.array([f"{root}/{rel}" for rel in table.column("shard").to_pylist()], pa.string())
    table = table.set_column(table.schema.get_field_index("shard"), "shard", shard_col)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    index = buf.getvalue()
    s3.put_bytes(f"{root}/{INDEX}", index)
    s3.put_bytes(f"{root}/{STATS}", (staged / STATS).read_bytes())
    s3.put_bytes(f"{root}/{MANIFEST}", _json(manifest))
    return manifest, index


def latest_version(base: str) -> str | None:
    """The version `latest.json` under `base` names, or None when there is none."""
    url = f"{base}/{LATEST}"
    if not s3.exists(url):
        return None
    try:
        return str(json.loads(s3.read_bytes(url))["version"])
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(url, f"is not a publish pointer ({err})", '{"version": ..., "manifest": ...}') from err


def _discard(base: str, version: str) -> None:
    """Delete an unfinished version, its manifest first; a version `latest.json` names is kept."""
    if latest_version(base) == version:
        return
    root = f"{base}/{VERSIONS}/{version}"
    s3.delete(f"{root}/{MANIFEST}")
    s3.delete_prefix(root)


def discard_pending(pending: Path) -> None:
    """Remove the version a failed or killed publish recorded in `pending`, if any."""
    if not pending.is_file():
        return
    record = json.loads(pending.read_text())
    log(f"publish: removing {record['base']}/{VERSIONS}/{record['version']}, left unfinished by an earlier run")
    _discard(record["base"], record["version"])
    pending.unlink()
