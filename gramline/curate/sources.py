"""Curation sources: every kind of `--source` behind one interface that yields `Item`s in a fixed order.

Kinds (picked from the URI, then from the content):
- a local directory: every file below it, recursively, in sorted order; images are recognised by
  decoding, not by extension (validation quarantines what is not one); dot-files are skipped.
- a `.tar` archive (local or `s3://`; also `.tar.gz`): read as a stream, never extracted. Members
  with absolute paths or `..` are rejected ("path-traversal"), links and devices "not-a-file".
  WebDataset sidecars (`<key>.txt`/`.caption` caption, `<key>.cls` label, `<key>.json`) next to an
  image with the same key are attached to it rather than treated as images.
- a `.parquet` or `.csv` manifest (local or `s3://`): one row per image with a path/URI column
  (relative paths are relative to the manifest) and optional label and caption columns.
- `s3://bucket/prefix`: every object in the folder `prefix/`, in key order (`s3://b/raw` never
  takes `raw2/...`).
- a set of tar shards (WebDataset's layout): a local directory or S3 prefix holding only tar
  archives, or a brace pattern such as `s3://b/shards/train-{000000..000999}.tar`; each shard is
  read as a tar above, in name (pattern) order. Its size is its shard count: the plan cuts it into
  partitions of whole shards without reading them (gramline.curate.partition). An item's reference is
  `<shard>/<member>`; a shard that is not a readable tar, or ends early, is quarantined
  ("unreadable-shard"), never fatal.
- `synthetic:n=N,size=S,seed=K`: the procedural shapes world (gramline.data.synthetic).

`open_source` checks a source up front (exists, non-empty, readable, has a path column): a bad
source is an InputError naming it, so the stage exits 2 before any work. Problems with single
items are never fatal: they surface as rejections or load errors and end up in quarantine. An S3
read that keeps failing transiently is not a problem of the item: its TransientError stops the run.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from gramline.data import s3
from gramline.errors import InputError

MANIFEST_SUFFIXES = (".parquet", ".csv")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SIDECAR_EXTS = {"txt", "caption", "cls", "json"}
DEFAULT_PATH_COLUMNS = ("path", "uri", "url", "image_path", "filepath", "file", "image")


@dataclass
class Payload:
    """What loading an item gives: the file bytes, plus fields only known after loading."""

    data: bytes
    seg: bytes | None = None
    label_name: str | None = None
    caption: str | None = None


@dataclass
class Item:
    source: str                 # the --source as given
    ref: str                    # the item inside it: relative path, tar member, manifest row, S3 key
    location: str               # a full, human-readable address (path, s3:// URL, tar#member)
    load: Callable[[], Payload] | None = None
    rejection: tuple[str, str] | None = None  # (reason, detail) found while listing
    label_name: str = ""
    caption: str | None = None

    @property
    def key(self) -> str:
        """A stable, dot-free WebDataset key derived from the source and the reference."""
        return hashlib.sha1(f"{self.source}\0{self.ref}".encode()).hexdigest()[:20]


class Source(Protocol):
    uri: str

    def items(self) -> Iterator[Item]: ...

    def size_hint(self) -> int | None: ...


# --------------------------------------------------------------------------- helpers


def _read_local(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _payload_of(read: Callable[[Any], bytes], where: Any) -> Payload:
    return Payload(read(where))


def _same(payload: Payload) -> Payload:
    return payload


def _label_from_relpath(rel: str, enabled: bool) -> str:
    parts = rel.split("/")
    return parts[0] if enabled and len(parts) > 1 else ""


def _unsafe_member_name(name: str) -> bool:
    """Absolute, drive-qualified or '..'-containing names would escape an extraction directory."""
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or (len(normalised) > 1 and normalised[1] == ":"):
        return True
    return ".." in normalised.split("/")


# --------------------------------------------------------------------------- sources


class FolderSource:
    def __init__(self, uri: str, root: Path, folder_labels: bool) -> None:
        self.uri, self.root, self.folder_labels = uri, root, folder_labels
        self._files = self._list()
        if not self._files:
            raise InputError(f"--source {uri}", "is a directory with no files", "a directory holding images")

    def _list(self) -> list[str]:
        files: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=None):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = os.path.relpath(dirpath, self.root)
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                rel = name if rel_dir == "." else posixpath.join(Path(rel_dir).as_posix(), name)
                files.append(rel)
        files.sort()  # one global order of relative paths, whatever the walk order
        return files

    def size_hint(self) -> int | None:
        return len(self._files)

    def items(self) -> Iterator[Item]:
        for rel in self._files:
            path = self.root / rel
            yield Item(self.uri, rel, str(path), load=partial(_payload_of, _read_local, path),
                       label_name=_label_from_relpath(rel, self.folder_labels))


class S3PrefixSource:
    def __init__(self, uri: str, folder_labels: bool) -> None:
        self.uri, self.folder_labels = uri, folder_labels
        self.bucket, prefix = s3.split_url(uri)
        self.prefix = prefix
        objects = s3.list_objects(uri, what="--source")
        if not objects:
            where = "bucket" if not prefix else "prefix"
            raise InputError(f"--source {uri}", f"has no objects under this {where}", "an S3 prefix holding images")
        self._keys = [key for key, _ in objects]

    def size_hint(self) -> int | None:
        return len(self._keys)

    def items(self) -> Iterator[Item]:
        base = s3.folder_prefix(self.prefix)
        for key in self._keys:
            rel = key.removeprefix(base)
            url = f"s3://{self.bucket}/{key}"
            yield Item(self.uri, key, url, load=partial(_payload_of, s3.read_bytes, url),
                       label_name=_label_from_relpath(rel, self.folder_labels))


def _tar_items(uri: str, opener: Callable[[], Any], source: str, prefix: str = "") -> Iterator[Item]:
    """The items of the tar `uri` (members grouped WebDataset-style), as items of `source` whose
    references are `prefix` + the member name."""
    group: list[tuple[tarfile.TarInfo, bytes | None]] = []
    current: str | None = None
    with opener() as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
        for info in tar:
            if info.isdir():
                continue
            name = info.name
            location = f"{uri}#{name}"
            if _unsafe_member_name(name):
                yield from _flush(group, uri, source, prefix)
                group, current = [], None
                yield Item(source, prefix + name, location, rejection=("path-traversal",
                           f"member name {name!r} is absolute or contains '..'; not extracted"))
                continue
            if not info.isreg():
                yield from _flush(group, uri, source, prefix)
                group, current = [], None
                kind = "symlink" if info.issym() else "hard link" if info.islnk() else "special file"
                yield Item(source, prefix + name, location, rejection=("not-a-file", f"member is a {kind}"))
                continue
            key = _wds_key(name)
            if key != current:
                yield from _flush(group, uri, source, prefix)
                group, current = [], key
            member = tar.extractfile(info)
            group.append((info, member.read() if member is not None else b""))
        yield from _flush(group, uri, source, prefix)


def _flush(group: list[tuple[tarfile.TarInfo, bytes | None]], uri: str, source: str, prefix: str) -> Iterator[Item]:
    """Emit a WebDataset group: images get the group's sidecars; lone sidecars stay items."""
    sidecars = {_ext(info.name): data for info, data in group if _ext(info.name) in SIDECAR_EXTS}
    images = [(info, data) for info, data in group if _ext(info.name) not in SIDECAR_EXTS]
    if not images:
        images, sidecars = group, {}
    caption = _text(sidecars.get("txt") or sidecars.get("caption"))
    label = _text(sidecars.get("cls")) or ""
    for info, data in images:
        payload = Payload(data or b"")
        yield Item(source, prefix + info.name, f"{uri}#{info.name}", load=partial(_same, payload),
                   label_name=label.strip(), caption=caption)


class TarSource:
    def __init__(self, uri: str, opener: Callable[[], Any]) -> None:
        self.uri, self.opener = uri, opener
        try:
            with self.opener() as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
                first = tar.next()
        except (tarfile.TarError, EOFError, OSError) as err:
            raise InputError(f"--source {uri}", f"is not a readable tar archive ({err})", "a .tar file") from err
        if first is None:
            raise InputError(f"--source {uri}", "is an empty tar archive", "a tar archive holding images")

    def size_hint(self) -> int | None:
        return None

    def items(self) -> Iterator[Item]:
        return _tar_items(self.uri, self.opener, self.uri)


class ShardSetSource:
    """Tar shards read one after the other; `items(first, stop)` reads shards [first, stop) only."""

    def __init__(self, uri: str, shards: Sequence[str], names: Sequence[str], opener: Callable[[str], Any]) -> None:
        """`shards`: the shards' URIs in order; `names`: their names in item references."""
        self.uri, self.shards, self.names, self.opener = uri, list(shards), list(names), opener

    def size_hint(self) -> int | None:
        return None

    def shard_count(self) -> int:
        return len(self.shards)

    def items(self, first: int = 0, stop: int | None = None) -> Iterator[Item]:
        for shard, name in zip(self.shards[first:stop], self.names[first:stop]):
            listed = 0
            try:
                for item in _tar_items(shard, partial(self.opener, shard), self.uri, f"{name}/"):
                    listed += 1
                    yield item
            except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
                what = f"after {listed} item(s)" if listed else "at its start"
                yield Item(self.uri, f"{name}/", shard, rejection=("unreadable-shard",
                           f"not a readable tar archive {what} ({type(err).__name__}: {err})"))


def _wds_key(name: str) -> str:
    directory, base = posixpath.split(name)
    return posixpath.join(directory, base.split(".", 1)[0])


def _ext(name: str) -> str:
    base = posixpath.basename(name)
    return base.split(".", 1)[1].lower() if "." in base else ""


def _text(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None


class ManifestSource:
    def __init__(self, uri: str, table: pa.Table, base: str, path_columns: Sequence[str],
                 label_column: str, caption_column: str) -> None:
        self.uri, self.base = uri, base
        names = table.column_names
        path_col = next((c for c in path_columns if c in names), None)
        if path_col is None:
            raise InputError(f"--source {uri}", f"has no path column (columns: {', '.join(names) or 'none'})",
                             "a column named one of " + ", ".join(path_columns))
        if table.num_rows == 0:
            raise InputError(f"--source {uri}", "has no rows", "a manifest listing at least one image")
        self.paths = [None if v is None else str(v) for v in table.column(path_col).to_pylist()]
        self.labels = ([None if v is None else str(v) for v in table.column(label_column).to_pylist()]
                       if label_column in names else [None] * table.num_rows)
        self.captions = ([None if v is None else str(v) for v in table.column(caption_column).to_pylist()]
                         if caption_column in names else [None] * table.num_rows)

    def size_hint(self) -> int | None:
        return len(self.paths)

    def _resolve(self, value: str) -> str:
        if value.startswith(("s3://", "/")):
            return value
        if value.startswith("file://"):
            return value[len("file://"):]
        if self.base.startswith("s3://"):
            return posixpath.join(self.base, value)
        return os.path.join(self.base, value)

    def items(self) -> Iterator[Item]:
        for row, (value, label, caption) in enumerate(zip(self.paths, self.labels, self.captions)):
            ref = f"row {row}: {value}"
            if not value:
                yield Item(self.uri, ref, f"{self.uri}#row{row}", rejection=("unreadable", "empty path"))
                continue
            target = self._resolve(value)
            yield Item(self.uri, ref, target, load=partial(_payload_of, _load_target, target),
                       label_name=label or "", caption=caption)


def _load_target(target: str) -> bytes:
    if target.startswith("s3://"):
        return s3.read_bytes(target, "manifest entry")
    if "://" in target:
        raise OSError(f"unsupported URL scheme in {target!r} (local paths and s3:// only)")
    return _read_local(Path(target))


class SyntheticSource:
    """`synthetic:n=N,size=S,seed=K`: N procedural images of S x S pixels (render indices 0..N-1)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        spec: dict[str, int] = {"size": 64, "seed": 0}
        body = uri[len("synthetic:"):]
        for part in filter(None, body.split(",")):
            name, sep, value = part.partition("=")
            if not sep or name not in ("n", "size", "seed"):
                raise InputError(f"--source {uri}", f"has an unknown or malformed field {part!r}",
                                 "synthetic:n=N,size=S,seed=K")
            try:
                spec[name] = int(value)
            except ValueError:
                raise InputError(f"--source {uri}", f"field {name}={value!r} is not an integer") from None
        if spec.get("n", 0) < 1:
            raise InputError(f"--source {uri}", "needs n >= 1", "synthetic:n=N,size=S,seed=K")
        if spec["size"] < 16:
            raise InputError(f"--source {uri}", f"size={spec['size']} is too small", "size >= 16")
        self.n, self.size, self.seed = spec["n"], spec["size"], spec["seed"]

    def size_hint(self) -> int | None:
        return self.n

    def items(self) -> Iterator[Item]:
        for index in range(self.n):
            yield Item(self.uri, f"index={index}", f"synthetic:seed={self.seed}:index={index}",
                       load=partial(self._render, index))

    def _render(self, index: int) -> Payload:
        from gramline.data.synthetic import CLASSES, encode_png, render_sample

        sample = render_sample(self.seed, index, self.size)
        return Payload(encode_png(sample.image), seg=encode_png(sample.mask),
                       label_name=CLASSES[sample.label], caption=sample.caption)


# --------------------------------------------------------------------------- dispatch


def _read_table(uri: str, data_or_path: Any, suffix: str) -> pa.Table:
    try:
        if suffix == ".parquet":
            return pq.read_table(data_or_path)
        return pacsv.read_csv(data_or_path)
    except (pa.ArrowInvalid, pa.ArrowException, OSError, ValueError) as err:
        kind = "parquet" if suffix == ".parquet" else "CSV"
        raise InputError(f"--source {uri}", f"is not a readable {kind} manifest ({err})",
                         f"a {kind} file with a path column") from err


def open_source(
    uri: str,
    folder_labels: bool = False,
    path_columns: Sequence[str] = DEFAULT_PATH_COLUMNS,
    label_column: str = "label",
    caption_column: str = "caption",
) -> Source:
    """Check `uri` and return its Source; a missing, empty or unreadable source is an InputError."""
    if uri.startswith("synthetic:"):
        return SyntheticSource(uri)
    lower = uri.lower()
    if "{" in uri:
        return _shard_pattern(uri)
    if s3.is_s3_url(uri):
        s3.split_url(uri)  # checks the bucket name
        if lower.endswith(TAR_SUFFIXES + MANIFEST_SUFFIXES):
            if not s3.exists(uri):
                raise InputError(f"--source {uri}", "does not exist", "an existing S3 object")
            if lower.endswith(TAR_SUFFIXES):
                return TarSource(uri, lambda: s3.open_object(uri))
            suffix = ".parquet" if lower.endswith(".parquet") else ".csv"
            table = _read_table(uri, io.BytesIO(s3.read_bytes(uri, "--source")), suffix)
            return ManifestSource(uri, table, posixpath.dirname(uri), path_columns, label_column, caption_column)
        prefix = S3PrefixSource(uri, folder_labels)
        if all(key.lower().endswith(TAR_SUFFIXES) for key in prefix._keys):
            base = s3.folder_prefix(prefix.prefix)
            return ShardSetSource(uri, [f"s3://{prefix.bucket}/{key}" for key in prefix._keys],
                                  [key.removeprefix(base) for key in prefix._keys], _open_s3_shard)
        return prefix
    if "://" in uri and not uri.startswith("file://"):
        raise InputError(f"--source {uri}", "has an unsupported scheme",
                         "a local path, s3://bucket/prefix or synthetic:n=N,size=S,seed=K")
    path = Path(uri.removeprefix("file://"))
    if not path.exists():
        raise InputError(f"--source {uri}", "does not exist", "a directory, .tar, .parquet/.csv manifest")
    if path.is_dir():
        folder = FolderSource(uri, path, folder_labels)
        if all(rel.lower().endswith(TAR_SUFFIXES) for rel in folder._files):
            return ShardSetSource(uri, [str(path / rel) for rel in folder._files], folder._files, _open_local_shard)
        return folder
    if not os.access(path, os.R_OK):
        raise InputError(f"--source {uri}", "is not readable", "a readable file")
    if lower.endswith(MANIFEST_SUFFIXES):
        suffix = ".parquet" if lower.endswith(".parquet") else ".csv"
        table = _read_table(uri, str(path), suffix)
        return ManifestSource(uri, table, str(path.parent), path_columns, label_column, caption_column)
    if lower.endswith(TAR_SUFFIXES) or tarfile.is_tarfile(path):
        return TarSource(uri, lambda: open(path, "rb"))
    raise InputError(f"--source {uri}", "is a file that is neither a tar archive nor a .parquet/.csv manifest",
                     "a directory, .tar, .parquet/.csv manifest, s3:// prefix or synthetic:...")


def _open_local_shard(path: str) -> Any:
    return open(path, "rb")


def _open_s3_shard(url: str) -> Any:
    return s3.open_object(url, "shard")


def _shard_pattern(uri: str) -> ShardSetSource:
    """The shards a brace pattern names (`train-{000000..000999}.tar`, `{a,b}.tar`), each checked to
    exist: against one listing of the pattern's folder on S3."""
    from braceexpand import braceexpand

    expected = "a brace pattern of tar shards, e.g. s3://bucket/shards/train-{000000..000999}.tar"
    try:
        shards = list(braceexpand(uri))
    except Exception as err:  # noqa: BLE001 - braceexpand raises plain errors on malformed patterns
        raise InputError(f"--source {uri}", f"is not a valid brace pattern ({err})", expected) from None
    if not all(shard.lower().endswith(TAR_SUFFIXES) for shard in shards) or len(set(shards)) != len(shards):
        raise InputError(f"--source {uri}", "names files that are not distinct tar archives", expected)
    folder = posixpath.dirname(shards[0])
    if any(posixpath.dirname(shard) != folder for shard in shards):
        raise InputError(f"--source {uri}", "names shards in more than one folder", expected)
    if s3.is_s3_url(uri):
        bucket, _ = s3.split_url(folder + "/")
        present = {f"s3://{bucket}/{key}" for key, _ in s3.list_objects(folder, what="--source")}
        opener: Callable[[str], Any] = _open_s3_shard
    else:
        shards = [shard.removeprefix("file://") for shard in shards]
        present = {shard for shard in shards if Path(shard).is_file()}
        opener = _open_local_shard
    missing = [shard for shard in shards if shard not in present]
    if missing:
        raise InputError(f"--source {uri}", f"names {len(missing)} shard(s) that do not exist, e.g. {missing[0]}",
                         expected)
    return ShardSetSource(uri, shards, [posixpath.basename(shard) for shard in shards], opener)
