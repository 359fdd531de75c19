"""Dataset artifacts: WebDataset tar shards + index.parquet + stats.json + manifest.json.

Writing: `DatasetWriter` (shards rolled by sample count and byte size, each shard written to a
temp name and renamed when complete, manifest last, partial output removed on error).
Reading: `open_dataset` -> `DatasetInfo`; `iter_samples` (evaluation: every sample of a split,
fixed order); `ShardStream` (training: shuffled, resampled or one epoch, split by rank and by
DataLoader worker, resumable at an exact sample position).

Layout and index columns: docs/architecture.md, "Dataset artifact".
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch.utils.data
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from webdataset.tariterators import base_plus_ext

from gramline.artifacts import MANIFEST, build_manifest, read_manifest, write_manifest
from gramline.data.storage import open_url
from gramline.errors import InputError
from gramline.io import atomic_path, fsync_dir, write_json_atomic

INDEX = "index.parquet"
STATS = "stats.json"
SHARDS_DIR = "shards"
IMAGE_EXTS = {"png": "PNG", "jpg": "JPEG"}
INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("shard", pa.string()), ("source", pa.string()),
    ("sha256", pa.string()), ("size", pa.int64()), ("width", pa.int32()), ("height", pa.int32()),
    ("label", pa.int32()), ("cluster", pa.string()), ("duplicate_of", pa.string()),
])
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

    def __enter__(self) -> DatasetWriter:
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
               "duplicate_of": sample.duplicate_of}
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


# ---------------------------------------------------------------------------------------------
# Reading


def read_shard(url: str, wanted: Callable[[int], bool] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (ordinal, raw sample) for the samples of one tar shard, in file order.

    A raw sample maps extensions to bytes plus `__key__`. `wanted(ordinal)` selects samples; the
    others are passed over without reading their data (local files are seeked over).
    """
    with open_url(url) as fh:
        try:
            with tarfile.open(fileobj=fh, mode="r:") if fh.seekable() else tarfile.open(fileobj=fh, mode="r|") as tar:
                ordinal, key, sample = -1, None, None
                for info in tar:
                    if not info.isreg():
                        continue
                    base, ext = base_plus_ext(info.name)
                    if base is None:
                        continue
                    if base != key:
                        if sample is not None:
                            yield ordinal, sample
                        key, ordinal = base, ordinal + 1
                        sample = {"__key__": base} if wanted is None or wanted(ordinal) else None
                    if sample is not None:
                        member = tar.extractfile(info)
                        assert member is not None
                        sample[ext.lower()] = member.read()
                if sample is not None:
                    yield ordinal, sample
        except tarfile.TarError as err:
            raise InputError(f"shard {url}", f"is not a readable tar file ({err})", "a WebDataset tar shard") from err


def count_samples(url: str) -> int:
    """Number of samples in a shard, from the tar headers only."""
    last = -1

    def note(ordinal: int) -> bool:
        nonlocal last
        last = ordinal
        return False

    for _ in read_shard(url, wanted=note):
        pass
    return last + 1


@dataclass
class DatasetInfo:
    """An opened Dataset artifact. Shard URLs are absolute local paths or s3:// URLs."""

    root: Path
    manifest: dict[str, Any]
    classes: list[str]
    splits: dict[str, int]
    shards: dict[str, list[str]]
    _index: pa.Table | None = field(default=None, repr=False)

    @property
    def index(self) -> pa.Table:
        """index.parquet as a pyarrow Table (read on first use)."""
        if self._index is None:
            path = self.root / INDEX
            if not path.is_file():
                raise InputError(f"dataset {self.root}", f"has no {INDEX}", "a complete Dataset artifact")
            self._index = pq.read_table(path)
        return self._index

    def shard_urls(self, split: str) -> list[str]:
        urls = self.shards.get(split) or []
        if not self.splits.get(split) or not urls:
            have = sorted(s for s, n in self.splits.items() if n)
            raise InputError(f"dataset {self.root} split {split!r}", "is empty or missing", f"one of {have}")
        return urls

    def shard_counts(self, split: str) -> list[int]:
        """Samples per shard of `split`, in shard order."""
        urls = self.shard_urls(split)
        counts = (self.manifest.get("shard_counts") or {}).get(split)
        if counts is None:  # datasets written before shard_counts was recorded: use the index
            rels = self.manifest["shards"][split]
            column = self.index.column("shard").to_pylist()
            tally = Counter(column)
            counts = [tally.get(rel, 0) for rel in rels]
        if len(counts) != len(urls):
            raise InputError(f"dataset {self.root} manifest shard_counts[{split!r}]",
                             f"has {len(counts)} entries for {len(urls)} shards", "one count per shard")
        return [int(c) for c in counts]

    def stream(self, split: str = "train", **kwargs: Any) -> ShardStream:
        """A ShardStream over `split` (kwargs as ShardStream's; seed defaults to 0)."""
        kwargs.setdefault("seed", 0)
        return ShardStream(self.shard_urls(split), shard_counts=self.shard_counts(split), **kwargs)


def open_dataset(path: Path | str) -> DatasetInfo:
    root = Path(path)
    manifest = read_manifest(root, kind="Dataset", flag="dataset")
    for name, kind in (("splits", dict), ("shards", dict), ("classes", list)):
        if not isinstance(manifest.get(name), kind):
            raise InputError(f"{root / MANIFEST} field {name!r}", "is missing or malformed", f"a {kind.__name__}")
    base = root.resolve()
    shards = {
        split: [u if "://" in u else str(base / u) for u in urls] for split, urls in manifest["shards"].items()
    }
    return DatasetInfo(root=root, manifest=manifest, classes=list(manifest["classes"]),
                       splits={k: int(v) for k, v in manifest["splits"].items()}, shards=shards)


def _image_member(raw: dict[str, Any]) -> bytes:
    for ext in ("png", "jpg", "jpeg"):
        if ext in raw:
            return raw[ext]
    raise InputError(f"sample {raw.get('__key__')}", "has no image member", "<key>.png or <key>.jpg")


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def iter_samples(path_or_info: Path | str | DatasetInfo, split: str = "eval", decode: bool = True) -> Iterator[dict]:
    """Every sample of `split`, in shard and file order.

    Each item: key, image (PIL RGB, or the encoded bytes if not decode), label, label_name,
    mask (uint8 array or None; PNG bytes if not decode), caption (str or None), meta (the json).
    """
    info = path_or_info if isinstance(path_or_info, DatasetInfo) else open_dataset(path_or_info)
    for url in info.shard_urls(split):
        for _, raw in read_shard(url):
            meta = json.loads(raw["json"]) if "json" in raw else {}
            image: Any = _image_member(raw)
            mask: Any = raw.get("seg.png")
            if decode:
                image = decode_image(image)
                if mask is not None:
                    with Image.open(io.BytesIO(mask)) as im:
                        mask = np.asarray(im, dtype=np.uint8).copy()
            yield {"key": raw["__key__"], "image": image, "label": int(meta.get("label", -1)),
                   "label_name": meta.get("label_name", ""), "mask": mask,
                   "caption": raw["txt"].decode() if "txt" in raw else None, "meta": meta}


# ---------------------------------------------------------------------------------------------
# Training stream

StreamMode = Literal["shuffle", "resample", "epoch"]
MIN_SHARDS_PER_RANK = 2
"""Ranks get whole shards when every rank gets at least this many; otherwise every rank reads all
shards and keeps every world_size-th sample."""


class ShardStream(torch.utils.data.IterableDataset):
    """Decoded training samples for one rank: dicts(key, image PIL RGB, label, caption, index).

    The rank's sample sequence is a pure function of (seed, mode, rank, world_size, shards): epoch
    e takes a seeded shard order (a permutation, or draws with replacement for "resample"), gives
    this rank its share (whole shards, or every world_size-th sample when shards are few), and
    shuffles locally by sorting on position + uniform(0, shuffle_buffer) jitter. "shuffle" and
    "resample" run forever (epoch e reshuffles with seed and e); "epoch" is one pass.

    `index` is the sample's position in the rank's sequence. A stream built with
    `start_position=N` yields exactly positions N, N+1, ... of the same sequence, so the engine
    stores "samples consumed by this rank" in its checkpoint and resumes from it.

    DataLoader workers: worker i (of W) yields the blocks of `batch_size` consecutive positions
    numbered i, i+W, i+2W, ... counted from start_position. With the DataLoader's `batch_size`
    equal to this `batch_size` (1 when the DataLoader does not batch), the DataLoader returns the
    rank's sequence in order, whatever the number of workers. Each worker reads only the samples
    it yields (others are skipped at the tar-member level, never decoded).
    """

    def __init__(
        self,
        shard_urls: list[str],
        seed: int,
        mode: StreamMode = "shuffle",
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 512,
        *,
        batch_size: int = 1,
        start_position: int = 0,
        shard_counts: list[int] | None = None,
        transform: Callable[[dict], Any] | None = None,
    ) -> None:
        super().__init__()
        if not shard_urls:
            raise InputError("shard_urls", "is empty", "at least one shard")
        if mode not in ("shuffle", "resample", "epoch"):
            raise InputError("stream mode", f"is {mode!r}", "'shuffle', 'resample' or 'epoch'")
        if not 0 <= rank < world_size:
            raise InputError("rank", f"is {rank} with world_size {world_size}", "0 <= rank < world_size")
        for name, value, low in (("shuffle_buffer", shuffle_buffer, 0), ("batch_size", batch_size, 1),
                                 ("start_position", start_position, 0)):
            if int(value) < low:
                raise InputError(name, f"is {value}", f"an integer >= {low}")
        self.urls = list(shard_urls)
        self.seed, self.mode, self.rank, self.world_size = int(seed), mode, rank, world_size
        self.shuffle_buffer, self.batch_size, self.start_position = shuffle_buffer, batch_size, start_position
        self.transform = transform
        counts = list(shard_counts) if shard_counts is not None else [count_samples(u) for u in self.urls]
        if len(counts) != len(self.urls):
            raise InputError("shard_counts", f"has {len(counts)} entries for {len(self.urls)} shards",
                             "one count per shard")
        for url, n in zip(self.urls, counts):
            if n < 1:
                raise InputError(f"shard {url}", "holds no samples", "at least one sample per shard")
        self.counts = np.asarray(counts, dtype=np.int64)
        self.shard_split = len(self.urls) >= MIN_SHARDS_PER_RANK * world_size
        if not self.shard_split and int(self.counts.sum()) < world_size:
            raise InputError("dataset", f"has {int(self.counts.sum())} samples for {world_size} ranks",
                             "at least one sample per rank")

    # -- the rank's sequence -------------------------------------------------------------------

    def _shard_order(self, epoch: int) -> np.ndarray:
        n = len(self.urls)
        if self.mode == "epoch" and self.shuffle_buffer == 0:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, epoch, 0])  # the same on every rank
        return rng.integers(0, n, n) if self.mode == "resample" else rng.permutation(n)

    def _plan(self, epoch: int) -> tuple[np.ndarray, int, int]:
        """This rank's shards for `epoch`, and (M, m): keep the k-th sample of their concatenation
        when k % M == m."""
        order = self._shard_order(epoch)
        if self.shard_split:
            return order[self.rank::self.world_size], 1, 0
        return order, self.world_size, self.rank

    def epoch_length(self, epoch: int = 0) -> int:
        """Samples this rank yields in `epoch`."""
        shards, modulus, offset = self._plan(epoch)
        total = int(self.counts[shards].sum())
        return len(range(offset, total, modulus))

    def _epoch_sequence(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(block, ordinal) of every input of this rank's epoch, in reading order, and the output
        order as input positions. Block j is the j-th shard of the plan (a shard can occur twice
        when resampling)."""
        shards, modulus, offset = self._plan(epoch)
        blocks, ordinals, base = [], [], 0
        for j, s in enumerate(shards):
            n = int(self.counts[s])
            o = np.arange((offset - base) % modulus, n, modulus)
            blocks.append(np.full(o.size, j))
            ordinals.append(o)
            base += n
        block = np.concatenate(blocks)
        ordinal = np.concatenate(ordinals)
        order = np.arange(block.size)
        if self.shuffle_buffer > 0 and block.size:
            rng = np.random.default_rng([self.seed, epoch, self.rank, 1])
            order = np.argsort(order + rng.uniform(0, self.shuffle_buffer, order.size), kind="stable")
        return block, ordinal, order, shards

    def loader(self, num_workers: int = 0, **kwargs: Any) -> torch.utils.data.DataLoader:
        """A DataLoader over this stream with the matching batch size (see the class docstring)."""
        return torch.utils.data.DataLoader(self, batch_size=self.batch_size, num_workers=num_workers, **kwargs)

    # -- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        start = self.start_position
        epoch, epoch_start = 0, 0
        while True:
            length = self.epoch_length(epoch)
            if epoch_start + length > start or self.mode == "epoch":
                break
            epoch_start += length
            epoch += 1
        while True:
            length = self.epoch_length(epoch)
            positions = np.arange(max(start, epoch_start), epoch_start + length)
            mine = positions[((positions - start) // self.batch_size) % workers == worker]
            if mine.size:
                yield from self._yield(epoch, mine - epoch_start, epoch_start)
            if self.mode == "epoch":
                return
            epoch_start += length
            epoch += 1

    def _yield(self, epoch: int, outputs: np.ndarray, epoch_start: int) -> Iterator[Any]:
        block, ordinal, order, shards = self._epoch_sequence(epoch)
        needed = order[outputs]  # input positions, in output order
        reader = self._read_inputs(np.sort(needed), block, ordinal, shards)
        stash: dict[int, dict[str, Any]] = {}
        for out_pos, q in zip(outputs.tolist(), needed.tolist()):
            while q not in stash:
                got, raw = next(reader)
                stash[got] = raw
            sample = self._decode(stash.pop(q), epoch_start + out_pos)
            yield self.transform(sample) if self.transform is not None else sample

    def _read_inputs(self, inputs: np.ndarray, block: np.ndarray, ordinal: np.ndarray,
                     shards: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
        """(input position, raw sample) for the sorted `inputs`, reading each shard once."""
        blocks = block[inputs]
        bounds = np.flatnonzero(np.diff(blocks)) + 1
        for group in np.split(inputs, bounds):
            url = self.urls[int(shards[block[group[0]]])]
            want = dict(zip(ordinal[group].tolist(), group.tolist()))
            last = int(ordinal[group[-1]])
            found = 0
            samples = read_shard(url, wanted=want.__contains__)
            try:
                for o, raw in samples:
                    yield want[o], raw
                    found += 1
                    if o == last:
                        break
            finally:
                samples.close()  # type: ignore[attr-defined]  # a generator: closes the shard now
            if found != len(want):
                raise InputError(f"shard {url}", f"has fewer samples than the {len(want)} expected",
                                 "the sample count recorded in the manifest")

    @staticmethod
    def _decode(raw: dict[str, Any], index: int) -> dict[str, Any]:
        meta = json.loads(raw["json"]) if "json" in raw else {}
        return {"key": raw["__key__"], "image": decode_image(_image_member(raw)),
                "label": int(meta.get("label", -1)),
                "caption": raw["txt"].decode() if "txt" in raw else None, "index": int(index)}
