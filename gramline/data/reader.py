"""Reading a Dataset artifact: `open_dataset` -> `DatasetInfo`, `iter_samples` (every sample of a
split, in a fixed order, for evaluation) and `read_shard`, the tar reader under every reader.

Layout: gramline/data/format.py. Training reads through `DatasetInfo.stream` (gramline/data/stream.py).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from webdataset.tariterators import base_plus_ext

from gramline.artifacts import MANIFEST, read_manifest
from gramline.data.format import INDEX
from gramline.data.storage import open_url
from gramline.errors import InputError

if TYPE_CHECKING:
    from gramline.data.stream import ShardStream


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
        from gramline.data.stream import ShardStream  # the stream imports this module (and torch)

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


def image_member(raw: dict[str, Any]) -> bytes:
    """The encoded image of a raw sample (its `png`, `jpg` or `jpeg` member)."""
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
            image: Any = image_member(raw)
            mask: Any = raw.get("seg.png")
            if decode:
                image = decode_image(image)
                if mask is not None:
                    with Image.open(io.BytesIO(mask)) as im:
                        mask = np.asarray(im, dtype=np.uint8).copy()
            yield {"key": raw["__key__"], "image": image, "label": int(meta.get("label", -1)),
                   "label_name": meta.get("label_name", ""), "mask": mask,
                   "caption": raw["txt"].decode() if "txt" in raw else None, "meta": meta}

