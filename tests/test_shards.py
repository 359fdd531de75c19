"""Dataset artifact writer/readers: round trip, shard limits, atomicity, bad input, ShardStream."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch.utils.data
from PIL import Image

from gramline.data.reader import count_samples, iter_samples, open_dataset
from gramline.data.stream import ShardStream
from gramline.data.writer import DatasetWriter, ShardSample
from gramline.errors import InputError

CLASSES = ["zero", "one", "two"]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _image(i: int, size: int = 8) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (size, size + 1, 3), dtype=np.uint8)  # width != height on purpose


def _sample(i: int, split: str = "train", **kw) -> ShardSample:
    return ShardSample(key=f"{split}-{i:05d}", image=_png(_image(i)), label=i % 3, label_name=CLASSES[i % 3],
                       source=f"test:{i}", **kw)


def _write(out: Path, n_train: int, n_eval: int = 0, **kw) -> dict:
    with DatasetWriter(out, stage="test", config={"n": n_train}, **kw) as w:
        for i in range(n_train):
            w.add("train", _sample(i))
        for i in range(n_eval):
            w.add("eval", _sample(i, "eval"))
        return w.close(classes=CLASSES)


def _tar_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        names = [m.name for m in tar.getmembers()]
    return sorted({n.split(".", 1)[0] for n in names})


# ---- writer and readers ---------------------------------------------------------------------


def test_round_trip_bytes_labels_masks_captions(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    images = [_image(i) for i in range(6)]
    masks = [(np.arange(72).reshape(8, 9) % 4).astype(np.uint8) * (i % 2) for i in range(6)]
    samples = [
        ShardSample(key=f"k{i}", image=_png(images[i]) if i != 4 else _jpg(images[i]),
                    image_ext="png" if i != 4 else "jpg", label=i % 3, label_name=CLASSES[i % 3],
                    source=f"src-{i}", caption=f"caption {i}" if i % 2 == 0 else None,
                    seg=_png(masks[i]) if i != 3 else None, cluster=f"c{i % 2}",
                    duplicate_of="k0" if i == 5 else "", extra={"note": i})
        for i in range(6)
    ]
    with DatasetWriter(out, stage="test", config={"a": 1}, max_count=4) as w:
        for s in samples:
            w.add("eval", s)
        manifest = w.close(classes=CLASSES, stats={"extra_stat": 7})

    assert manifest["kind"] == "Dataset" and manifest["stage"] == "test"
    assert manifest["splits"] == {"eval": 6}
    assert manifest["shards"] == {"eval": ["shards/eval-000000.tar", "shards/eval-000001.tar"]}
    assert manifest["classes"] == CLASSES and manifest["config"] == {"a": 1} and manifest["inputs"] == []
    assert json.loads((out / "manifest.json").read_text())["splits"] == {"eval": 6}
    assert json.loads((out / "stats.json").read_text())["extra_stat"] == 7

    raw = list(iter_samples(out, "eval", decode=False))
    assert [r["key"] for r in raw] == [s.key for s in samples]
    for r, s in zip(raw, samples):
        assert r["image"] == s.image
        assert r["mask"] == s.seg
        assert r["label"] == s.label and r["label_name"] == s.label_name
        assert r["caption"] == s.caption
        assert r["meta"]["note"] == s.extra["note"] and r["meta"]["source"] == s.source

    decoded = list(iter_samples(open_dataset(out), "eval"))
    for i, r in enumerate(decoded):
        assert r["image"].mode == "RGB" and r["image"].size == (9, 8)
        if i != 4:  # PNG is lossless
            assert np.array_equal(np.asarray(r["image"]), images[i])
        if i == 3:
            assert r["mask"] is None
        else:
            assert r["mask"].dtype == np.uint8 and np.array_equal(r["mask"], masks[i])

    index = pq.read_table(out / "index.parquet").to_pylist()
    assert [row["key"] for row in index] == [s.key for s in samples]
    for row, s in zip(index, samples):
        assert row["sha256"] == hashlib.sha256(s.image).hexdigest()
        assert (row["width"], row["height"], row["size"]) == (9, 8, len(s.image))
        assert row["split"] == "eval" and row["label"] == s.label
        assert row["cluster"] == s.cluster and row["duplicate_of"] == s.duplicate_of
    assert [row["shard"] for row in index] == ["shards/eval-000000.tar"] * 4 + ["shards/eval-000001.tar"] * 2


def test_max_count_per_shard(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "ds", 23, 2, max_count=5)
    assert manifest["splits"] == {"train": 23, "eval": 2}
    assert manifest["shard_counts"]["train"] == [5, 5, 5, 5, 3]
    keys = []
    for rel in manifest["shards"]["train"]:
        got = _tar_keys(tmp_path / "ds" / rel)
        assert len(got) <= 5
        keys += got
    assert keys == [f"train-{i:05d}" for i in range(23)]


def test_max_bytes_per_shard(tmp_path: Path) -> None:
    # each sample: noise PNG (~500 B) + json: about 2.5 KiB of tar; 30 KiB shards hold a few each
    limit = 30_000
    manifest = _write(tmp_path / "ds", 40, max_bytes=limit)
    paths = [tmp_path / "ds" / rel for rel in manifest["shards"]["train"]]
    assert len(paths) > 3
    assert all(p.stat().st_size <= limit for p in paths)
    assert sum(len(_tar_keys(p)) for p in paths) == 40


def test_exception_inside_writer_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "new"
    with pytest.raises(RuntimeError, match="boom"), DatasetWriter(out, stage="test", max_count=3) as w:
        for i in range(10):
            w.add("train", _sample(i))
        # mid-write: complete shards are visible under their final names, no manifest yet
        assert len(list((out / "shards").glob("train-*.tar"))) == 3
        assert not (out / "manifest.json").exists()
        raise RuntimeError("boom")
    assert not out.exists()

    existing = tmp_path / "kfp-made"  # an output dir created beforehand (as KFP does) is kept, empty
    existing.mkdir()
    with pytest.raises(RuntimeError), DatasetWriter(existing, stage="test", max_count=3) as w:
        for i in range(5):
            w.add("train", _sample(i))
        raise RuntimeError("boom")
    assert existing.is_dir() and list(existing.iterdir()) == []


def test_failed_close_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    with pytest.raises(InputError, match="labels"), DatasetWriter(out, stage="test") as w:
        w.add("train", _sample(2))
        w.close(classes=["only-one"])  # label 2 has no class name
    assert not out.exists()


def test_leaving_without_close_removes_output(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="close"), DatasetWriter(out, stage="test") as w:
        w.add("train", _sample(0))
    assert not out.exists()


def test_complete_dataset_is_not_overwritten_by_default(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    _write(out, 4)
    with pytest.raises(InputError, match=str(out)):
        DatasetWriter(out, stage="test")
    assert open_dataset(out).splits == {"train": 4}
    manifest = _write(out, 2, overwrite=True)
    assert manifest["splits"] == {"train": 2}
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["train-000000.tar"]


def test_incomplete_leftovers_are_replaced(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "train-000007.tar").write_bytes(b"stale")
    (out / "shards" / ".train-000000.tar.abc.tmp").write_bytes(b"partial")
    _write(out, 3)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["train-000000.tar"]


@pytest.mark.parametrize("key", ["has.dot", "a/b", "", "white space", "x" * 81])
def test_bad_keys_are_rejected(key: str) -> None:
    with pytest.raises(InputError, match="sample key"):
        ShardSample(key=key, image=_png(_image(0)))


def test_bad_sample_fields_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="image_ext"):
        ShardSample(key="a", image=_png(_image(0)), image_ext="gif")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="JPEG"):
        ShardSample(key="a", image=_jpg(_image(0)), image_ext="png")
    with pytest.raises(InputError, match="cannot be read"):
        ShardSample(key="a", image=b"not an image")
    with pytest.raises(InputError, match="seg"):
        ShardSample(key="a", image=_png(_image(0)), seg=b"not a png")
    with pytest.raises(InputError, match="label"):
        ShardSample(key="a", image=_png(_image(0)), label=-2)
    with DatasetWriter(tmp_path / "ds", stage="test") as w:
        w.add("train", _sample(0))
        with pytest.raises(InputError, match="twice"):
            w.add("eval", _sample(0))
        with pytest.raises(InputError, match="split"):
            w.add("tr.ain", _sample(1))
        w.close(classes=CLASSES)


def test_open_dataset_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(InputError, match=str(missing)):
        open_dataset(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=f"{empty}.*manifest"):
        open_dataset(empty)
    model = tmp_path / "model"
    model.mkdir()
    (model / "manifest.json").write_text(json.dumps({"kind": "Model", "schema_version": 1}))
    with pytest.raises(InputError, match=f"{model}.*Model"):
        open_dataset(model)
    ds = tmp_path / "ds"
    _write(ds, 3)
    with pytest.raises(InputError, match=f"{ds}.*'eval'.*empty"):
        list(iter_samples(ds, "eval"))


# ---- ShardStream ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def five_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 shards of 12, 12, 12, 12, 7 samples."""
    out = tmp_path_factory.mktemp("stream") / "ds"
    _write(out, 55, max_count=12)
    return out


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stream1") / "ds"
    _write(out, 21)
    return out


def _loader_keys(stream: ShardStream, n: int | None, workers: int, batch: int) -> list[tuple[str, int]]:
    loader = torch.utils.data.DataLoader(stream, batch_size=batch, num_workers=workers,
                                         collate_fn=lambda b: [(s["key"], s["index"]) for s in b])
    items = itertools.chain.from_iterable(loader)
    return list(itertools.islice(items, n))


def _stream(path: Path, **kw) -> ShardStream:
    return open_dataset(path).stream("train", **kw)


def test_shard_counts_match_the_tars(five_shards: Path) -> None:
    info = open_dataset(five_shards)
    assert info.shard_counts("train") == [count_samples(u) for u in info.shard_urls("train")] == [12] * 4 + [7]


@pytest.mark.parametrize("dataset,world", [("five_shards", 2), ("one_shard", 2), ("five_shards", 3)])
def test_epoch_mode_is_disjoint_and_complete_over_ranks_and_workers(dataset: str, world: int,
                                                                   request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(dataset)
    all_keys = [f"train-{i:05d}" for i in range(open_dataset(path).splits["train"])]
    seen: list[str] = []
    for rank in range(world):
        stream = _stream(path, seed=3, mode="epoch", rank=rank, world_size=world, batch_size=4)
        got = _loader_keys(stream, None, workers=2, batch=4)
        assert [i for _, i in got] == list(range(len(got)))  # the rank's positions, in order
        assert len(got) == stream.epoch_length(0)
        seen += [k for k, _ in got]
    assert len(seen) == len(set(seen))  # disjoint
    assert sorted(seen) == all_keys  # complete


def test_stream_is_deterministic_and_seeded(five_shards: Path) -> None:
    a = [s["key"] for s in itertools.islice(_stream(five_shards, seed=1), 80)]
    b = [s["key"] for s in itertools.islice(_stream(five_shards, seed=1), 80)]
    c = [s["key"] for s in itertools.islice(_stream(five_shards, seed=2), 80)]
    assert a == b and a != c
    assert sorted(a[:55]) == [f"train-{i:05d}" for i in range(55)]  # epoch 0 is a permutation
    assert a[:25] != sorted(a[:25])  # and is shuffled
    assert a[55:80] != a[:25]  # epoch 1 reshuffles


def test_sequence_does_not_depend_on_workers(five_shards: Path) -> None:
    ref = [(s["key"], s["index"]) for s in itertools.islice(_stream(five_shards, seed=5, batch_size=3), 130)]
    assert [i for _, i in ref] == list(range(130))
    assert _loader_keys(_stream(five_shards, seed=5, batch_size=3), 130, workers=2, batch=3) == ref


@pytest.mark.parametrize("mode", ["shuffle", "resample"])
@pytest.mark.parametrize("world", [1, 2])
def test_resume_at_exact_position(five_shards: Path, mode: str, world: int) -> None:
    n_done, n_more, batch = 36, 60, 4  # crosses at least one epoch boundary
    for rank in range(world):
        kw = {"seed": 11, "mode": mode, "rank": rank, "world_size": world, "batch_size": batch,
              "shuffle_buffer": 16}
        full = [(s["key"], s["index"]) for s in itertools.islice(_stream(five_shards, **kw), n_done + n_more)]
        assert [i for _, i in full] == list(range(n_done + n_more))
        for workers in (0, 2):
            resumed = _loader_keys(_stream(five_shards, start_position=n_done, **kw), n_more, workers, batch)
            assert resumed == full[n_done:], (rank, workers)


def test_resume_sample_split_and_odd_position(one_shard: Path) -> None:
    kw = {"seed": 4, "mode": "shuffle", "rank": 1, "world_size": 2, "batch_size": 2, "shuffle_buffer": 5}
    full = [s["key"] for s in itertools.islice(_stream(one_shard, **kw), 40)]
    assert len(set(full[:10])) == 10  # rank 1 holds 10 of the 21 samples per epoch
    for start in (7, 10, 23):  # odd, epoch boundary, a later epoch
        got = [k for k, _ in _loader_keys(_stream(one_shard, start_position=start, **kw), 40 - start, 2, 2)]
        assert got == full[start:]


def test_resume_skips_without_decoding(five_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gramline.data import stream as stream_module

    calls = []
    real = stream_module.decode_image
    monkeypatch.setattr(stream_module, "decode_image", lambda data: calls.append(1) or real(data))
    stream = _stream(five_shards, seed=0, start_position=500)
    list(itertools.islice(stream, 10))
    assert len(calls) == 10


def test_resample_draws_shards_with_replacement(five_shards: Path) -> None:
    stream = _stream(five_shards, seed=0, mode="resample")
    orders = [tuple(stream._shard_order(e)) for e in range(20)]
    assert any(len(set(o)) < 5 for o in orders)  # some shard drawn twice in an epoch
    keys = [s["key"] for s in itertools.islice(stream, 200)]
    assert set(keys) <= {f"train-{i:05d}" for i in range(55)}


def test_stream_bad_inputs(five_shards: Path, tmp_path: Path) -> None:
    info = open_dataset(five_shards)
    urls = info.shard_urls("train")
    with pytest.raises(InputError, match="mode"):
        ShardStream(urls, seed=0, mode="sometimes")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="rank"):
        ShardStream(urls, seed=0, rank=2, world_size=2)
    with pytest.raises(InputError, match="shard_urls"):
        ShardStream([], seed=0)
    missing = str(tmp_path / "nope.tar")
    with pytest.raises(InputError, match="nope.tar"):
        ShardStream([missing], seed=0)
    not_tar = tmp_path / "bad.tar"
    not_tar.write_bytes(b"x" * 700)
    with pytest.raises(InputError, match="bad.tar"):
        ShardStream([str(not_tar)], seed=0)
    with pytest.raises(InputError, match="55 samples for 60 ranks"):
        _stream(five_shards, seed=0, world_size=60, rank=0)


def test_streams_that_cannot_seek_read_the_same(five_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Object-store readers (s3://) are forward-only; skipping then reads past members."""
    from gramline.data import reader

    class ForwardOnly(io.RawIOBase):
        def __init__(self, path: str) -> None:
            self.fh = open(path, "rb")  # noqa: SIM115 (closed in close())

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

        def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
            return self.fh.readinto(buf)

        def close(self) -> None:
            self.fh.close()
            super().close()

    kw = {"seed": 9, "rank": 1, "world_size": 2, "batch_size": 2, "start_position": 13}
    ref = [(s["key"], s["index"]) for s in itertools.islice(_stream(five_shards, **kw), 30)]
    monkeypatch.setattr(reader, "open_url", ForwardOnly)
    assert [(s["key"], s["index"]) for s in itertools.islice(_stream(five_shards, **kw), 30)] == ref


def test_empty_dataset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no samples"), DatasetWriter(tmp_path / "ds", stage="test") as w:
        w.close(classes=[])
    assert not (tmp_path / "ds").exists()


def test_loader_batches_are_consecutive_positions(five_shards: Path) -> None:
    stream = _stream(five_shards, seed=2, batch_size=5, start_position=17)
    loader = stream.loader(num_workers=2, collate_fn=lambda b: [s["index"] for s in b])
    batches = list(itertools.islice(iter(loader), 6))
    assert batches == [list(range(17 + 5 * k, 22 + 5 * k)) for k in range(6)]
