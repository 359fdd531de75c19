"""Ingest sources: folders, tars (path traversal rejected), parquet/CSV manifests, S3, synthetic,
and bad sources named in InputErrors. S3 is moto's real server on 127.0.0.1 (`s3_server`)."""

from __future__ import annotations

import io
import tarfile
import uuid
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gramline.curate.sources import open_source
from gramline.data import s3
from gramline.data.storage import open_url
from gramline.errors import InputError


def _png(seed: int, size: int = 40) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _bucket(name_hint: str) -> str:
    name = f"{name_hint}-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def _tar(path: Path, members: list[tuple[str, bytes | None, str]]) -> None:
    """members: (name, data, kind) with kind "file" | "symlink"."""
    with tarfile.open(path, "w") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data or b"")
                tar.addfile(info, io.BytesIO(data or b""))


def _loaded(source) -> list[tuple[str, str | None, bytes | None, str, str | None]]:
    """(ref, rejection reason, bytes, label, caption) per item."""
    out = []
    for item in source.items():
        try:
            data = item.load().data if item.load is not None else None
        except OSError:  # e.g. a manifest row whose file is missing: quarantined as "unreadable"
            data = None
        out.append((item.ref, item.rejection[0] if item.rejection else None, data, item.label_name, item.caption))
    return out


def test_folder_is_recursive_sorted_and_content_based(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    (root / "cats" / "deep").mkdir(parents=True)
    (root / "dogs").mkdir()
    (root / "cats" / "b.png").write_bytes(_png(1))
    (root / "cats" / "deep" / "no_extension").write_bytes(_png(2))  # an image without an extension
    (root / "dogs" / "a.jpeg").write_bytes(_png(3))                 # PNG bytes with a .jpeg name
    (root / "readme.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"\0\0")                        # dot-files are skipped
    items = _loaded(open_source(str(root), folder_labels=True))
    assert [ref for ref, *_ in items] == ["cats/b.png", "cats/deep/no_extension", "dogs/a.jpeg", "readme.txt"]
    assert [label for *_, label, _ in items] == ["cats", "cats", "dogs", ""]
    assert items[1][2] == _png(2)
    keys = [item.key for item in open_source(str(root)).items()]
    assert len(set(keys)) == 4 and all("." not in k for k in keys)
    assert keys == [item.key for item in open_source(str(root)).items()]  # stable


def test_tar_rejects_traversal_and_links_and_reads_sidecars(tmp_path: Path) -> None:
    archive = tmp_path / "inside" / "data.tar"
    archive.parent.mkdir()
    _tar(archive, [
        ("good/0001.png", _png(1), "file"),
        ("good/0001.txt", b"a caption", "file"),
        ("good/0001.cls", b"7", "file"),
        ("../evil.png", _png(2), "file"),
        ("/abs/evil2.png", _png(3), "file"),
        ("good/../../evil3.png", _png(4), "file"),
        ("link.png", None, "symlink"),
        ("good/0002.png", _png(5), "file"),
        ("lonely.json", b"{}", "file"),
    ])
    items = _loaded(open_source(str(archive)))
    by_ref = {ref: (reason, data, label, caption) for ref, reason, data, label, caption in items}
    assert by_ref["good/0001.png"] == (None, _png(1), "7", "a caption")
    assert by_ref["good/0002.png"][:2] == (None, _png(5))
    for bad in ("../evil.png", "/abs/evil2.png", "good/../../evil3.png"):
        assert by_ref[bad][0] == "path-traversal" and by_ref[bad][1] is None
    assert by_ref["link.png"][0] == "not-a-file"
    assert by_ref["lonely.json"][0] is None  # a lone sidecar is an item (validation calls it non-image)
    assert "good/0001.txt" not in by_ref and "good/0001.cls" not in by_ref
    # nothing was extracted anywhere
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "evil3.png").exists()
    assert not Path("/abs/evil2.png").exists()


def test_parquet_and_csv_manifests(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png(1))
    (tmp_path / "img" / "b.png").write_bytes(_png(2))
    absolute = tmp_path / "elsewhere.png"
    absolute.write_bytes(_png(3))
    table = pa.table({"path": ["img/a.png", str(absolute), "img/missing.png", "img/b.png"],
                      "label": [1, 2, 1, 3], "caption": ["first", None, "third", "fourth"]})
    pq.write_table(table, tmp_path / "list.parquet")
    items = _loaded(open_source(str(tmp_path / "list.parquet")))
    assert [(d, lab, cap) for _, _, d, lab, cap in items if d is not None] == [
        (_png(1), "1", "first"), (_png(3), "2", None), (_png(2), "3", "fourth")]
    missing = next(item for item in open_source(str(tmp_path / "list.parquet")).items() if "missing" in item.ref)
    with pytest.raises(OSError):
        missing.load()
    (tmp_path / "list.csv").write_text("uri,caption\nimg/b.png,hello\nimg/a.png,\n")
    items = _loaded(open_source(str(tmp_path / "list.csv")))
    assert [d for _, _, d, _, _ in items] == [_png(2), _png(1)]
    assert items[0][4] == "hello"


def test_synthetic_source() -> None:
    from gramline.data.synthetic import CLASSES, render_sample

    source = open_source("synthetic:n=3,size=32,seed=4")
    payloads = [item.load() for item in source.items()]
    assert len(payloads) == 3
    sample = render_sample(4, 2, 32)
    assert payloads[2].label_name == CLASSES[sample.label] and payloads[2].caption == sample.caption
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(payloads[2].data))), sample.image)
    assert payloads[2].seg is not None


def test_bad_sources_are_named(tmp_path: Path) -> None:
    def problem(uri: str) -> str:
        with pytest.raises(InputError) as err:
            open_source(uri)
        assert uri in str(err.value)
        return str(err.value)

    assert "does not exist" in problem(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    assert "no files" in problem(str(tmp_path / "empty"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    assert "not a readable parquet" in problem(str(tmp_path / "broken.parquet"))
    pq.write_table(pa.table({"filename": ["a.png"], "label": [1]}), tmp_path / "nopath.parquet")
    message = problem(str(tmp_path / "nopath.parquet"))
    assert "no path column" in message and "filename" in message
    (tmp_path / "nopath.csv").write_text("name,label\na.png,1\n")
    assert "no path column" in problem(str(tmp_path / "nopath.csv"))
    (tmp_path / "data.bin").write_bytes(b"x" * 2000)
    assert "neither a tar" in problem(str(tmp_path / "data.bin"))
    (tmp_path / "bad.tar").write_bytes(b"x" * 2000)
    assert "tar" in problem(str(tmp_path / "bad.tar"))
    assert "unsupported scheme" in problem("gs://bucket/images")
    assert "malformed" in problem("synthetic:n=3,colour=red")


def test_s3_prefix_manifest_and_tar(s3_server: str, tmp_path: Path) -> None:
    bucket = _bucket("ingest")
    client = boto3.client("s3")
    for i in range(3):
        client.put_object(Bucket=bucket, Key=f"photos/cls{i % 2}/{i:03d}.png", Body=_png(i))
    client.put_object(Bucket=bucket, Key="other/x.png", Body=_png(9))
    client.put_object(Bucket=bucket, Key="photos2/cls0/009.png", Body=_png(9))  # a sibling, not in photos/
    items = _loaded(open_source(f"s3://{bucket}/photos", folder_labels=True))
    assert [ref for ref, *_ in items] == ["photos/cls0/000.png", "photos/cls0/002.png", "photos/cls1/001.png"]
    assert [label for *_, label, _ in items] == ["cls0", "cls0", "cls1"]
    assert items[2][2] == _png(1)

    buf = io.BytesIO()
    pq.write_table(pa.table({"path": ["photos/cls0/000.png", f"s3://{bucket}/other/x.png"]}), buf)
    client.put_object(Bucket=bucket, Key="lists/m.parquet", Body=buf.getvalue())
    # relative entries of an S3 manifest are relative to the manifest's "directory"
    client.put_object(Bucket=bucket, Key="lists/photos/cls0/000.png", Body=_png(0))
    items = _loaded(open_source(f"s3://{bucket}/lists/m.parquet"))
    assert [d for _, _, d, _, _ in items] == [_png(0), _png(9)]

    _tar(tmp_path / "t.tar", [("a.png", _png(7), "file"), ("../b.png", _png(8), "file")])
    client.upload_file(str(tmp_path / "t.tar"), bucket, "archives/t.tar")
    items = _loaded(open_source(f"s3://{bucket}/archives/t.tar"))
    assert [(ref, reason, d) for ref, reason, d, _, _ in items] == [("a.png", None, _png(7)), ("../b.png", "path-traversal", None)]


def test_s3_bad_sources(s3_server: str) -> None:
    bucket = _bucket("empty")
    for uri, words in [(f"s3://{bucket}", "no objects"), (f"s3://{bucket}/prefix/", "no objects"),
                       ("s3://no-such-bucket-xyz/images", "bucket that does not exist"),
                       (f"s3://{bucket}/missing.parquet", "does not exist")]:
        with pytest.raises(InputError) as err:
            open_source(uri)
        assert uri in str(err.value) and words in str(err.value)


def test_s3_stream_reads_whole_object_and_resumes_after_a_broken_read(s3_server: str) -> None:
    bucket = _bucket("stream")
    payload = np.random.default_rng(0).integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()
    s3.put_bytes(f"s3://{bucket}/big.bin", payload)
    with open_url(f"s3://{bucket}/big.bin") as fh:
        assert fh.read() == payload
    # break the connection after the first read: the reader re-opens with a byte range
    reader = s3._ObjectReader(f"s3://{bucket}/big.bin")
    first = reader.read(1000)
    real_body = reader._body

    class Broken:
        def read(self, n: int) -> bytes:
            raise s3.botocore.exceptions.ResponseStreamingError(error="connection reset")

        def close(self) -> None:
            real_body.close()

    reader._body = Broken()
    rest = b"".join(iter(lambda: reader.read(1 << 16), b""))
    assert first + rest == payload
    with pytest.raises(InputError, match="does not exist"):
        open_url(f"s3://{bucket}/nope.tar")
