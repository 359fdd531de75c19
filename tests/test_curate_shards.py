"""Curation of a set of tar shards (WebDataset's layout): a directory or S3 prefix of tars, or a brace
pattern. The plan cuts it by whole shards without reading them; any cut gives the same dataset;
an unreadable or truncated shard is quarantined, not fatal. S3 is moto's server on 127.0.0.1.
"""

import io
import json
import re
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_curate_dedup import make_copy, scene
from test_curate_partitions import _png, _tables, reduce_backwards, run_curate_dag

from gramline.config import load_stage_config
from gramline.curate import pipeline as cp
from gramline.curate.config import CurateConfig
from gramline.errors import InputError
from gramline.stages import curate as stage

SETTINGS = {"ingest.chunk_size": 5, "ingest.workers": 1, "split.eval_fraction": 0.25, "balance.target": 0.8}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _shards(root: Path) -> Path:
    """7 shards of WebDataset samples (image + .cls label + .txt caption): 24 originals, exact and
    near copies of them in other shards, a corrupt image; then a shard that is no tar at all and
    one cut off in its middle (its first samples still count)."""
    rng = np.random.default_rng(11)
    originals = [scene(rng, int(rng.integers(90, 140)), int(rng.integers(90, 140))) for _ in range(24)]
    samples = [(f"o{i:03d}", _png(image, "PNG"), "png", f"class{i % 3}") for i, image in enumerate(originals)]
    samples += [(f"e{n:03d}", _png(originals[5 * n + 1], "BMP"), "bmp", "copies") for n in range(3)]
    samples += [(f"n{n:03d}", _png(make_copy(rng, originals[4 * n + 2], "resize"), "JPEG"), "jpg", "copies")
                for n in range(4)]
    samples.append(("bad", b"not an image", "png", "broken"))
    order = rng.permutation(len(samples))
    folder = root / "shards"
    folder.mkdir()
    for shard in range(5):
        with tarfile.open(folder / f"train-{shard:06d}.tar", "w") as tar:
            for k in order[shard::5]:
                key, data, ext, label = samples[k]
                _add(tar, f"{key}.{ext}", data)
                _add(tar, f"{key}.cls", label.encode())
                _add(tar, f"{key}.txt", f"a photo of {key}".encode())
    (folder / "train-000005.tar").write_bytes(b"this is not a tar archive" * 40)
    with tarfile.open(folder / "full.tar", "w") as tar:
        for i in range(3):
            _add(tar, f"late{i}.png", _png(scene(rng, 96, 96), "PNG"))
    full = (folder / "full.tar").read_bytes()
    (folder / "full.tar").unlink()
    (folder / "train-000006.tar").write_bytes(full[: len(full) * 2 // 3])  # the third sample is cut off
    return folder


def _curate(sources: list[str], out: Path, **settings: object) -> dict[str, list[dict]]:
    argv = [a for s in sources for a in ("--source", s)] + ["--out-dataset", str(out)]
    for key, value in {**SETTINGS, **settings}.items():
        argv += ["--set", f"{key}={value}"]
    assert stage.main(argv) == 0
    return _tables(out)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _shards(tmp_path_factory.mktemp("wds"))


def test_the_plan_cuts_a_shard_set_by_shards_without_reading_one(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "unread"
    folder.mkdir()
    for i in range(10):
        (folder / f"part-{i:04d}.tar").write_bytes(b"\0")  # read, any of them would fail
    cfg = load_stage_config(CurateConfig, "curate", "tiny", None, ["partition.shards=4"])
    plan = cp.plan([str(folder)], cfg)
    assert [(p.start, p.stop, p.shard_set) for p in plan.partitions] == [(0, 4, 0), (4, 8, 0), (8, 10, 0)]
    assert "0 items and 10 tar shards in 3 partition(s)" in capsys.readouterr().err


def test_any_cut_of_the_shards_gives_the_same_dataset_with_bad_shards_quarantined(shards: Path,
                                                                                 tmp_path: Path) -> None:
    one = _curate([str(shards)], tmp_path / "one", **{"partition.shards": 100})
    cut = _curate([str(shards)], tmp_path / "cut", **{"partition.shards": 2})
    assert cut == one

    assert {row["kind"] for row in one["duplicates"]} == {"exact", "near"}
    assert len(one["duplicates"]) == 7  # 3 exact and 4 near copies, in other shards than their originals

    def original(member: str) -> int:  # e<n> copies o<5n+1>, n<n> o<4n+2>
        kind, n = member[0], int(member[1:4])
        return {"o": n, "e": 5 * n + 1, "n": 4 * n + 2}[kind]

    assert all(original(_member(row["location"])) == original(_member(row["duplicate_of_location"]))
               for row in one["duplicates"])
    quarantined = {_member(row["location"]): row["reason"] for row in one["quarantine"]}
    assert quarantined == {"bad.png": "non-image", "train-000005.tar": "unreadable-shard",
                           "train-000006.tar": "unreadable-shard"}
    detail = {_member(row["location"]): row["detail"] for row in one["quarantine"]}
    assert "after 2 item(s)" in detail["train-000006.tar"] and "at its start" in detail["train-000005.tar"]
    kept = [_member(row["source"]) for row in one["index"]]  # one image of each original, balanced
    assert len({original(m) for m in kept if not m.startswith("late")}) == len([m for m in kept if not m.startswith("late")])
    assert not {m for m in kept if m.startswith("late")} - {"late0.png", "late1.png"}
    assert all(row["caption"] == f"a photo of {_member(row['source']).split('.')[0]}"
               for row in one["index"] if not _member(row["source"]).startswith("late"))


def _member(location: str) -> str:
    """`<shard>#<member>` → the member; a whole shard's location → the shard's name."""
    return location.rsplit("#", 1)[-1] if "#" in location else location.rsplit("/", 1)[-1]


def test_shards_on_s3_as_a_prefix_or_a_brace_pattern_give_the_local_dataset(s3_server: str, shards: Path,
                                                                           tmp_path: Path) -> None:
    import boto3

    bucket = f"wds-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    for path in sorted(shards.iterdir()):
        client.upload_file(str(path), bucket, f"datasets/wds/{path.name}")

    def by_ref(tables: dict[str, list[dict]]) -> dict[str, list[tuple]]:
        """Each row by its shard and member (the roots differ), with what it says about it."""
        return {name: sorted((row.get("location") or row["source"]).rsplit("/", 1)[-1] + str(
            [row.get(k) for k in ("split", "kind", "reason", "caption", "cluster")]) for row in rows)
            for name, rows in tables.items()}

    local = by_ref(_curate([str(shards)], tmp_path / "local", **{"partition.shards": 3}))
    prefix = by_ref(_curate([f"s3://{bucket}/datasets/wds"], tmp_path / "prefix", **{"partition.shards": 3}))
    pattern = f"s3://{bucket}/datasets/wds/train-{{000000..000006}}.tar"
    braces = by_ref(_curate([pattern], tmp_path / "braces", **{"partition.shards": 3}))
    assert prefix == local and braces == local


def test_the_kfp_local_dag_fans_out_over_shards_and_matches_one_partition(shards: Path, tmp_path: Path) -> None:
    run_dir = run_curate_dag(str(shards), {**SETTINGS, "partition.shards": 3}, tmp_path)
    manifests = [json.loads(p.read_text()) for p in run_dir.glob("for-loop-*-iteration-*/curate-partition/part/manifest.json")]
    assert sorted((m["start"], m["stop"]) for m in manifests) == [(0, 3), (3, 6), (6, 7)]
    dag = _tables(run_dir / "curate" / "dataset")
    assert dag == _curate([str(shards)], tmp_path / "one", **{"partition.shards": 100})


def test_mixed_sources_reduced_out_of_order_match_one_cut(shards: Path, tmp_path: Path) -> None:
    """A folder, a shard set and a single tar: counted runs are cut by items, the shard set by
    shards, and the partitions may be ingested in any order."""
    rng = np.random.default_rng(5)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(9):
        (folder / f"f{i}.png").write_bytes(_png(scene(rng, 90, 90), "PNG"))
    single = tmp_path / "single.tar"
    with tarfile.open(single, "w") as tar:
        for i in range(6):
            _add(tar, f"s{i}.png", _png(scene(rng, 90, 90), "PNG"))
    sources = [str(folder), str(shards), str(single)]
    overrides = [f"{k}={v}" for k, v in SETTINGS.items()] + ["partition.items=4", "partition.shards=3"]
    plan, roots = reduce_backwards(sources, overrides, tmp_path, tmp_path / "reduced")
    assert [(p.shard_set, p.start, p.stop) for p in plan.partitions] == [
        (-1, 0, 4), (-1, 4, 8), (-1, 8, 9), (1, 0, 3), (1, 3, 6), (1, 6, 7), (-1, 9, 13), (-1, 13, 15)]
    reduced = _tables(tmp_path / "reduced")
    assert reduced == _curate(sources, tmp_path / "whole", **{"partition.items": 1000, "partition.shards": 1000})

    cfg = load_stage_config(CurateConfig, "curate", "tiny", None, overrides)
    with pytest.raises(InputError, match=r"shards of source 1 \[3, 6\) of plan .* uncovered"):
        cp.reduce(sources, cfg, [r for r in roots if r.name != "part4"], tmp_path / "missing")


def test_a_resumed_shard_partition_continues_after_its_last_chunk(shards: Path, tmp_path: Path, capsys) -> None:
    cfg = load_stage_config(CurateConfig, "curate", "tiny", None,
                            [f"{k}={v}" for k, v in SETTINGS.items()] + ["partition.shards=4"])
    partition = cp.plan([str(shards)], cfg).partitions[0]
    whole = cp.run_partition([str(shards)], cfg, partition, tmp_path / "whole")
    resumed = tmp_path / "resumed"
    cp.run_partition([str(shards)], cfg, partition, resumed)
    (resumed / "manifest.json").unlink()
    for suffix in (".parquet", ".desc.npy", ".layout.npy"):
        (resumed / f"chunk-{whole['chunks'] - 1:06d}{suffix}").unlink()
    capsys.readouterr()
    again = cp.run_partition([str(shards)], cfg, partition, resumed)
    assert f"resuming after {whole['chunks'] - 1} complete chunk(s)" in capsys.readouterr().err
    assert again["items"] == whole["items"] and again["chunks"] == whole["chunks"]
    for i in range(whole["chunks"]):
        assert pq.read_table(resumed / f"chunk-{i:06d}.parquet").equals(
            pq.read_table(tmp_path / "whole" / f"chunk-{i:06d}.parquet"))


@pytest.mark.parametrize(("pattern", "message"), [
    ("{root}/train-{{000000..000009}}.tar", r"names 3 shard\(s\) that do not exist, e\.g\. .*train-000007\.tar"),
    ("{root}/train-{{000000..000003}}.png", "not distinct tar archives"),
])
def test_a_brace_pattern_naming_what_is_not_there_exits_2(shards: Path, tmp_path: Path, pattern: str, message: str,
                                                          capsys) -> None:
    source = pattern.format(root=shards)
    with pytest.raises(SystemExit) as exit_info:
        stage.main_cli(["--source", source, "--out-dataset", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert source in err and re.search(message, err), err
    assert not (tmp_path / "out").exists()
