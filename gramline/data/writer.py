"""Writing a Dataset artifact: `DatasetWriter` and the `ShardSample`s it takes.

Shards roll over by sample count and byte size; each is written under a temporary name and renamed
when complete, index.parquet and stats.json follow, and manifest.json comes last. On an error, or
when the writer is left without `close()`, everything it wrote is removed. Layout:
gramline/data/format.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from gramline.artifacts import MANIFEST, build_manifest, write_manifest
from gramline.data.format import INDEX, INDEX_SCHEMA, SHARDS_DIR, STATS
from gramline.errors import InputError
from gramline.io import atomic_path, fsync_dir, write_json_atomic

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

IMAGE_EXTS = {"png": "PNG", "jpg": "JPEG"}
_RESERVED_META = ("label", "label_name", "source", "cluster", "duplicate_of", "sha256", "width", "height")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_BAD_KEY_RE = re.compile(r"[.\s/\\]")
MAX_KEY_BYTES = 80  # a tar header holds a 100-byte name: key + ".seg.png" must fit without a pax header
_BLOCK, _RECORD = 512, 10240  # tar block and record sizes (a tar file is a whole number of records)


def check_key(key: str) -> None:
    """WebDataset splits a member name at its first dot, so keys must not contain one."""
    if not isinstance(key, str) or not key:
        raise InputError(f"sample key {key!r}", "is empty or not a string", "a non-empty string")
    if _BAD_KEY_RE.search(key) or not (key.isascii() and key.isprintable()):
        raise InputError(f"sample key {key!r}", "contains a dot, slash, whitespace or non-ASCII character",
                         "ASCII letters, digits, '-', '_' and similar (WebDataset splits names at the first dot)")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InputError(f"sample key {key!r}", f"is longer than {MAX_KEY_BYTES} bytes", "a shorter key")


@dataclass
class ShardSample:
    """One sample to write: encoded image bytes plus its label, caption, mask and provenance."""

    key: str
    image: bytes
    image_ext: Literal["png", "jpg"] = "png"
    label: int = -1
    label_name: str = ""
    source: str = ""
    caption: str | None = None
    seg: bytes | None = None  # PNG, uint8 per-pixel class id (0 = background, class c -> c + 1)
    cluster: str = ""
    duplicate_of: str = ""
    sha256: str | None = None  # default: sha256 of the image bytes
    width: int | None = None  # default: read from the image header
    height: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_key(self.key)
        where = f"sample {self.key}"
        if self.image_ext not in IMAGE_EXTS:
            raise InputError(f"{where} image_ext", f"is {self.image_ext!r}", "'png' or 'jpg'")
        if not isinstance(self.image, (bytes, bytearray)) or not self.image:
            raise InputError(f"{where} image", "is empty or not bytes", "encoded PNG or JPEG bytes")
        if self.width is None or self.height is None:
            try:
                with Image.open(io.BytesIO(self.image)) as im:
                    self.width, self.height = im.size
                    fmt = im.format
            except (UnidentifiedImageError, OSError) as err:
                raise InputError(f"{where} image", f"cannot be read ({err})", "a PNG or JPEG image") from err
            if fmt != IMAGE_EXTS[self.image_ext]:
                raise InputError(f"{where} image", f"is {fmt} but image_ext is {self.image_ext!r}",
                                 "image_ext matching the encoded format")
        if self.seg is not None and not bytes(self.seg[:8]) == b"\x89PNG\r\n\x1a\n":
            raise InputError(f"{where} seg", "is not a PNG", "a PNG-encoded uint8 mask")
        if not isinstance(self.label, (int, np.integer)) or self.label < -1:
            raise InputError(f"{where} label", f"is {self.label!r}", "an integer >= -1 (-1 = no label)")
        self.label = int(self.label)
        if self.sha256 is None:
            self.sha256 = hashlib.sha256(self.image).hexdigest()
        clash = sorted(set(self.extra) & set(_RESERVED_META))
        if clash:
            raise InputError(f"{where} extra", f"repeats the reserved fields {clash}", "other names")

    def meta(self) -> dict[str, Any]:
        """The sample's `<key>.json`."""
        return {**self.extra, "label": self.label, "label_name": self.label_name, "source": self.source,
                "cluster": self.cluster, "duplicate_of": self.duplicate_of, "sha256": self.sha256,
                "width": self.width, "height": self.height}

    def members(self) -> dict[str, bytes]:
        """Tar members by extension (the WebDataset layout)."""
        out = {self.image_ext: bytes(self.image), "json": json.dumps(self.meta(), sort_keys=True).encode()}
        if self.seg is not None:
            out["seg.png"] = bytes(self.seg)
        if self.caption is not None:
            out["txt"] = self.caption.encode()
        return out


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _tar_bytes(members: dict[str, bytes]) -> int:
    """Bytes these members take in the tar stream: one header block each plus padded data."""
    return sum(_BLOCK + _round_up(len(v), _BLOCK) for v in members.values())


@dataclass
class _OpenShard:
    rel: str
    final: Path
    tmp: Path
    fileobj: BinaryIO
    writer: wds.TarWriter
    count: int = 0
    nbytes: int = 0  # member bytes so far; the file is _round_up(nbytes + 2 blocks, record)


class DatasetWriter:
    """Write a Dataset artifact. Use as a context manager: on an exception, or if the block ends
    without `close()`, everything this writer wrote is removed and no manifest exists.

        with DatasetWriter(out, stage="curate") as w:
            w.add("train", ShardSample(key=..., image=png_bytes, label=3))
            manifest = w.close(classes=[...])
    """

    def __init__(
        self,
        out_dir: Path | str,
        stage: str,
        config: dict | None = None,
        inputs: list | None = None,
        max_count: int = 1000,
        max_bytes: int = 256 << 20,
        overwrite: bool = False,
    ) -> None:
        if max_count < 1:
            raise InputError("shard max_count", f"is {max_count}", "at least 1 sample per shard")
        if max_bytes < _RECORD:
            raise InputError("shard max_bytes", f"is {max_bytes}", f"at least {_RECORD} bytes (one tar record)")
        self.out = Path(out_dir)
        self.stage, self.config, self.inputs = stage, dict(config or {}), list(inputs or [])
        self.max_count, self.max_bytes = max_count, max_bytes
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"output {self.out}", "exists and is not a directory", "a directory path")
        if (self.out / MANIFEST).exists():
            if not overwrite:
                raise InputError(f"output {self.out}", "already holds a complete artifact (manifest.json)",
                                 "a new or empty directory, or overwrite=True")
            (self.out / MANIFEST).unlink()  # from here on the old dataset is no longer complete
        self._created_dir = not self.out.exists()
        self._shard_dir = self.out / SHARDS_DIR
        self._created_shard_dir = not self._shard_dir.exists()
        self._shard_dir.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        self._open: dict[str, _OpenShard] = {}
        self._shards: dict[str, list[str]] = {}
        self._shard_counts: dict[str, list[int]] = {}
        self._finished: list[Path] = []
        self._written_meta: list[Path] = []
        self._keys: set[str] = set()
        self._rows: dict[str, list] = {name: [] for name in INDEX_SCHEMA.names}
        self._labels: dict[str, Counter] = {}
        self._bytes: Counter = Counter()
        self._state = "open"

    def _remove_leftovers(self) -> None:
        """Files of an earlier, incomplete (manifest-less) write into this directory."""
        for entry in self._shard_dir.iterdir():
            if entry.is_file() and (entry.suffix == ".tar" or entry.name.endswith(".tmp")):
                entry.unlink()
        for name in (INDEX, STATS):
            (self.out / name).unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._state == "open":
            self.abort()
            if exc_type is None:
                raise RuntimeError(f"DatasetWriter({self.out}) left without close(): its output was removed")

    def add(self, split: str, sample: ShardSample) -> None:
        if self._state != "open":
            raise RuntimeError(f"DatasetWriter({self.out}) is {self._state}")
        if not _SPLIT_RE.match(split):
            raise InputError(f"split {split!r}", "is not a valid split name", "letters, digits, '-' or '_'")
        if sample.key in self._keys:
            raise InputError(f"sample key {sample.key!r}", "appears twice", "unique keys across all splits")
        members = sample.members()
        size = _tar_bytes(members)
        shard = self._open.get(split)
        if shard is not None and (
            shard.count >= self.max_count or _round_up(shard.nbytes + size + 2 * _BLOCK, _RECORD) > self.max_bytes
        ):
            self._finish(split)
            shard = None
        if shard is None:
            shard = self._start(split)
        shard.writer.write({"__key__": sample.key, **members})
        shard.count += 1
        shard.nbytes = shard.writer.tarstream.offset
        self._keys.add(sample.key)
        row = {"key": sample.key, "split": split, "shard": shard.rel, "source": sample.source,
               "sha256": sample.sha256, "size": len(sample.image), "width": sample.width,
               "height": sample.height, "label": sample.label, "cluster": sample.cluster,
               "duplicate_of": sample.duplicate_of, "caption": sample.caption}
        for name, value in row.items():
            self._rows[name].append(value)
        self._labels.setdefault(split, Counter())[sample.label] += 1
        self._bytes[split] += len(sample.image)

    def _start(self, split: str) -> _OpenShard:
        name = f"{split}-{len(self._shards.setdefault(split, [])):06d}.tar"
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self._shard_dir)
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; shards are read by other users (pods, readers)
        fileobj = os.fdopen(fd, "wb")
        # A fixed integer mtime gives reproducible bytes and, with short ASCII names, plain 512-byte
        # headers (a float mtime or a non-ASCII name would add a pax header to every member).
        writer = wds.TarWriter(fileobj, encoder=False, mtime=0)
        shard = _OpenShard(f"{SHARDS_DIR}/{name}", self._shard_dir / name, Path(tmp), fileobj, writer)
        self._shards[split].append(shard.rel)
        self._open[split] = shard
        return shard

    def _finish(self, split: str) -> None:
        shard = self._open.pop(split)
        shard.writer.close()
        shard.fileobj.flush()
        os.fsync(shard.fileobj.fileno())
        shard.fileobj.close()
        os.replace(shard.tmp, shard.final)
        self._finished.append(shard.final)
        self._shard_counts.setdefault(split, []).append(shard.count)

    def close(
        self,
        classes: list[str],
        counts: dict | None = None,
        stats: dict | None = None,
        extra_manifest: dict | None = None,
    ) -> dict:
        """Finish the open shards, write index.parquet, stats.json and, last, manifest.json."""
        if self._state != "open":
            raise RuntimeError(f"DatasetWriter({self.out}) is {self._state}")
        try:
            classes = [str(c) for c in classes]
            for split in list(self._open):
                self._finish(split)
            fsync_dir(self._shard_dir)
            if not self._keys:
                raise InputError(f"output {self.out}", "would be a dataset with no samples", "at least one sample")
            for split, labels in self._labels.items():
                top = max(labels)
                if top >= len(classes):
                    raise InputError(f"split {split!r} labels", f"go up to {top} but there are {len(classes)} classes",
                                     "labels in [-1, len(classes))")
            splits = {split: sum(n) for split, n in self._shard_counts.items()}
            table = pa.table(self._rows, schema=INDEX_SCHEMA)
            self._written_meta.append(self.out / INDEX)
            with atomic_path(self.out / INDEX) as tmp:
                pq.write_table(table, tmp)
            summary = {
                "splits": {
                    split: {
                        "count": n, "shards": len(self._shards[split]), "image_bytes": self._bytes[split],
                        "labels": {(classes[k] if k >= 0 else "none"): v for k, v in sorted(self._labels[split].items())},
                    }
                    for split, n in splits.items()
                },
                **(stats or {}),
            }
            self._written_meta.append(self.out / STATS)
            write_json_atomic(self.out / STATS, summary)
            manifest = build_manifest(
                "Dataset", self.stage, config=self.config, inputs=self.inputs,
                counts={"samples": sum(splits.values()), "shards": len(self._finished), **splits, **(counts or {})},
                classes=classes, splits=splits, shards={s: list(v) for s, v in self._shards.items()},
                shard_counts={s: list(v) for s, v in self._shard_counts.items()}, **(extra_manifest or {}),
            )
            write_manifest(self.out, manifest)
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        return manifest

    def abort(self) -> None:
        """Remove everything this writer wrote; the directory is left as if it never ran."""
        self._state = "aborted"
        for shard in self._open.values():
            try:
                shard.writer.close()
                shard.fileobj.close()
            except (OSError, ValueError, tarfile.TarError):
                pass
            shard.tmp.unlink(missing_ok=True)
        self._open.clear()
        for path in [*self._finished, *self._written_meta]:
            path.unlink(missing_ok=True)
        if self._created_dir:
            shutil.rmtree(self.out, ignore_errors=True)
        elif self._created_shard_dir:
            shutil.rmtree(self._shard_dir, ignore_errors=True)
