"""S3 under faults: the curate stage and the shard readers against moto's server on 127.0.0.1
behind a seeded fault-injecting proxy (tests/s3_faults.py).

Transient faults (503 SlowDown, 500, resets, writes applied but answered 500, delays, stalls) are
absorbed with byte-identical results; only permanent answers quarantine a source; republishing
never touches a published dataset; an outage of any operation ends with exit 75, one message
naming the operation and the object, and nothing left behind after the next run.
Backoff is shortened through the environment knobs, and botocore's own retries are off
(AWS_MAX_ATTEMPTS=1: its backoff cannot be shortened), so the retries under test are ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from s3_faults import FaultPlan, FaultProxy
from test_curate_dedup import scene
from test_curate_stage import _save

from gramline.data.reader import iter_samples, open_dataset
from gramline.errors import TRANSIENT_EXIT_CODE, TransientError
from gramline.stages import curate as stage

REPO = Path(__file__).resolve().parents[1]
KNOBS = {"GRAMLINE_S3_ATTEMPTS": "6", "GRAMLINE_S3_BACKOFF_S": "0.002", "GRAMLINE_S3_TIMEOUT_S": "5",
         "AWS_MAX_ATTEMPTS": "1"}
COMMON = ["output.max_count=6", "ingest.workers=4"]
ALL_OPS = ("get", "head", "list", "put", "delete")
ENDPOINT: list[str] = []  # moto's own address, set by the `bucket` fixture
MODERATE = {op: {"slowdown": 0.1, "error500": 0.05, "unavailable": 0.05, "reset": 0.05, "applied500": 0.05,
                 "delay": 0.05} for op in ALL_OPS}


@pytest.fixture(scope="module")
def bucket(s3_server: str) -> str:
    """Sources: 24 images in `src/` (one not an image), a sibling `src2/` that `s3://b/src` must not
    take, and a CSV manifest naming one more image and one missing object."""
    name = f"faults-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=name)
    rng = np.random.default_rng(19)
    for i in range(24):
        client.put_object(Bucket=name, Key=f"src/x{i:02d}.png", Body=_save(scene(rng, 64, 56), "PNG"))
    client.put_object(Bucket=name, Key="src/broken.png", Body=b"\x89PNG\r\n\x1a\n" + b"not an image" * 50)
    client.put_object(Bucket=name, Key="src2/y.png", Body=_save(scene(rng, 64, 56), "PNG"))
    client.put_object(Bucket=name, Key="extra/e.png", Body=_save(scene(rng, 64, 56), "PNG"))
    client.put_object(Bucket=name, Key="lists/m.csv",
                      Body=f"path\ns3://{name}/extra/e.png\ns3://{name}/extra/missing.png\n".encode())
    ENDPOINT.append(s3_server)
    return name


def _sources(bucket: str) -> list[str]:
    return [f"s3://{bucket}/src", f"s3://{bucket}/lists/m.csv"]


def _argv(sources: list[str], out: Path, *overrides: str) -> list[str]:
    argv = [a for s in sources for a in ("--source", s)] + ["--out-dataset", str(out)]
    for item in [*COMMON, *overrides]:
        argv += ["--set", item]
    return argv


def _run(sources: list[str], out: Path, *overrides: str) -> dict:
    assert stage.main(_argv(sources, out, *overrides)) == 0
    return json.loads((out / "manifest.json").read_text())


def _fails(capsys: pytest.CaptureFixture[str], sources: list[str], out: Path, *overrides: str) -> str:
    """Run the stage as its command line does; it must exit 75 with one message and no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        stage.main_cli(_argv(sources, out, *overrides))
    err = capsys.readouterr().err
    assert exit_.value.code == TRANSIENT_EXIT_CODE, err
    assert "Traceback" not in err
    return err


def _direct() -> object:
    """A client that bypasses the proxy (the test's own view of the bucket)."""
    return boto3.client("s3", endpoint_url=ENDPOINT[-1])


def _get(url: str) -> bytes:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return _direct().get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[attr-defined]


def _keys(bucket: str, prefix: str) -> set[str]:
    pages = _direct().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)  # type: ignore[attr-defined]
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def _published_keys(manifest: dict) -> set[str]:
    """Every key of a published version: its shards, index, stats and manifest."""
    root = manifest["shards_uri"].removeprefix("s3://").partition("/")[2]
    shards = {u.removeprefix("s3://").partition("/")[2] for urls in manifest["shards"].values() for u in urls}
    return shards | {f"{root}/{name}" for name in ("index.parquet", "stats.json", "manifest.json")}


def _fingerprint(out: Path) -> dict:
    """What a run produced, independent of where its shards live (shard URLs made relative)."""
    manifest = json.loads((out / "manifest.json").read_text())
    root = manifest.get("shards_uri", "")

    def rel(url: str) -> str:
        return url.removeprefix(root + "/")

    shards = {rel(u): _get(u) if u.startswith("s3://") else (out / u).read_bytes()
              for urls in manifest["shards"].values() for u in urls}
    stats = json.loads((out / "stats.json").read_text())
    stats.pop("timings_s")
    return {"splits": manifest["splits"], "shard_counts": manifest["shard_counts"], "shards": shards,
            "index": [{**r, "shard": rel(r["shard"])} for r in pq.read_table(out / "index.parquet").to_pylist()],
            "quarantine": pq.read_table(out / "quarantine.parquet").to_pylist(), "stats": stats}


@pytest.fixture(scope="module")
def clean(bucket: str, s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Fault-free runs of the collection: a local dataset and one published to S3."""
    root = tmp_path_factory.mktemp("clean")
    _run(_sources(bucket), root / "local")
    _run(_sources(bucket), root / "published", f"output.shards_uri=s3://{bucket}/clean")
    return {"local": root / "local", "published": root / "published"}


@pytest.fixture
def through(monkeypatch: pytest.MonkeyPatch, s3_server: str) -> Iterator:
    """`with through(plan) as proxy:` sends the stage's S3 calls through a fault proxy."""
    for name, value in KNOBS.items():
        monkeypatch.setenv(name, value)

    @contextlib.contextmanager
    def start(plan: FaultPlan) -> Iterator[FaultProxy]:
        with FaultProxy(s3_server, plan, max_requests=5000, max_seconds=60) as proxy:
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
            try:
                yield proxy
            finally:
                monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
            assert not proxy.exhausted

    return start


def test_clean_run_quarantines_only_permanent_failures(clean: dict[str, Path]) -> None:
    quarantine = pq.read_table(clean["local"] / "quarantine.parquet").to_pylist()
    assert sorted((Path(r["location"]).name, r["reason"]) for r in quarantine) == [
        ("broken.png", "corrupt"), ("missing.png", "unreadable")], quarantine
    sources = {r["source"] for r in pq.read_table(clean["local"] / "duplicates.parquet").to_pylist()} | {
        r["source"] for r in pq.read_table(clean["local"] / "index.parquet").to_pylist()}
    assert not any("src2/" in s for s in sources)  # s3://b/src is the folder src/, not a string prefix


def test_moderate_faults_on_ingest_and_publish_give_the_same_dataset(
        bucket: str, clean: dict[str, Path], through, tmp_path: Path) -> None:
    with through(FaultPlan(seed=1, rates=MODERATE)) as proxy:
        manifest = _run(_sources(bucket), tmp_path / "out", f"output.shards_uri=s3://{bucket}/moderate")
    assert proxy.faults("get") >= 5 and proxy.faults("put") >= 2, proxy.injected
    assert _fingerprint(tmp_path / "out") == _fingerprint(clean["published"]) == _fingerprint(clean["local"])
    assert _keys(bucket, "moderate/") == _published_keys(manifest) | {"moderate/latest.json"}


def test_60_percent_503s_on_source_reads_lose_no_image(
        bucket: str, clean: dict[str, Path], through, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRAMLINE_S3_ATTEMPTS", "40")  # 0.6**40: no source ever runs out of attempts
    plan = FaultPlan(seed=2, rates={op: {"slowdown": 0.6} for op in ("get", "head", "list")})
    with through(plan) as proxy:
        _run(_sources(bucket), tmp_path / "out")
    assert proxy.faults("get") >= 20, proxy.injected
    assert _fingerprint(tmp_path / "out") == _fingerprint(clean["local"])  # same two quarantined, nothing else


def _stream(out: Path) -> list[tuple]:
    train = [(s["key"], s["image"].tobytes(), s["label"], s["caption"])
             for s in open_dataset(out).stream("train", mode="epoch", shuffle_buffer=0)]
    return train + [(s["key"], s["image"].tobytes()) for s in iter_samples(out, "eval")]


def test_streaming_under_resets_stalls_and_503s_reads_the_same_samples(
        clean: dict[str, Path], through, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _stream(clean["published"])
    monkeypatch.setenv("GRAMLINE_S3_TIMEOUT_S", "1")
    plan = FaultPlan(seed=5, rates={"get": {"reset": 0.3, "stall": 0.15, "slowdown": 0.2, "delay": 0.1}},
                     stall_s=2.0)
    with through(plan) as proxy:
        got = _stream(clean["published"])
    assert {kind for _, kind in proxy.injected} >= {"reset", "stall", "slowdown"}, (proxy.requests, proxy.injected)
    assert got == expected and len(got) == sum(json.loads(
        (clean["published"] / "manifest.json").read_text())["splits"].values())


def _snapshot(manifest_url: str) -> dict[str, bytes]:
    """A published dataset as read through its S3 manifest: the manifest and every object it names."""
    data = _get(manifest_url)
    manifest = json.loads(data)
    root = manifest["shards_uri"]
    urls = [u for urls in manifest["shards"].values() for u in urls] + [f"{root}/index.parquet", f"{root}/stats.json"]
    return {manifest_url: data, **{u: _get(u) for u in urls}}


def test_republishing_never_touches_the_published_dataset(
        bucket: str, through, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    prefix = f"s3://{bucket}/shared"
    first = _run(_sources(bucket), tmp_path / "first", f"output.shards_uri={prefix}")
    first_manifest = f"{first['shards_uri']}/manifest.json"
    before = _snapshot(first_manifest)
    first_samples = _stream(tmp_path / "first")
    other = ["synthetic:n=60,size=32,seed=4"]

    # an outage in the middle of the shard uploads: the failed publish removes what it wrote
    with through(FaultPlan(outage={"put": "/shards/train-000002"})):
        err = _fails(capsys, other, tmp_path / "second", f"output.shards_uri={prefix}")
    assert "upload" in err and "train-000002.tar" in err
    assert _snapshot(first_manifest) == before
    assert _keys(bucket, "shared/") == _published_keys(first) | {"shared/latest.json"}

    # the same publish succeeding (with moderate faults): a new version, the old one untouched
    with through(FaultPlan(seed=3, rates=MODERATE)):
        second = _run(other, tmp_path / "second", f"output.shards_uri={prefix}")
    assert second["shards_uri"] != first["shards_uri"]
    assert _snapshot(first_manifest) == before
    assert _stream(tmp_path / "first") == first_samples
    assert json.loads(_get(f"{prefix}/latest.json"))["manifest"] == f"{second['shards_uri']}/manifest.json"
    assert _keys(bucket, "shared/") == _published_keys(first) | _published_keys(second) | {"shared/latest.json"}


# operation → (the outage, what the message names); "delete" needs a failed publish to clean up
OUTAGES = {
    "list": ({"list": ""}, "list_objects_v2 of s3://{b}/src"),
    "head": ({"head": "/lists/m.csv"}, "head_object of s3://{b}/lists/m.csv"),
    "get": ({"get": "/src/"}, "get_object of s3://{b}/src/"),
    "put": ({"put": ""}, "upload (put_object/multipart) of s3://{b}/out-put/versions/"),
    "put-manifest": ({"put": "/manifest.json"}, "put_object of s3://{b}/out-put-manifest/versions/"),
    "delete": ({"put": "/manifest.json", "delete": ""}, "put_object of s3://{b}/out-delete/versions/"),
}


@pytest.mark.parametrize("op", list(OUTAGES))
def test_an_outage_ends_with_exit_75_and_the_next_run_leaves_nothing_behind(
        op: str, bucket: str, clean: dict[str, Path], through, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    outage, named = OUTAGES[op]
    prefix = f"out-{op}"
    args = (_sources(bucket), tmp_path / "out", f"output.shards_uri=s3://{bucket}/{prefix}")
    with through(FaultPlan(outage=outage)):
        err = _fails(capsys, *args)
    assert named.format(b=bucket) in err and "still failed after 6 attempts" in err, err
    if op == "delete":  # the failed publish could not clean up; neither can the next run yet
        assert _keys(bucket, prefix + "/")
        with through(FaultPlan(outage={"delete": ""})):
            err = _fails(capsys, *args)
        assert f"delete_objects of s3://{bucket}/{prefix}/versions/" in err, err
    manifest = _run(*args)
    assert _fingerprint(tmp_path / "out") == _fingerprint(clean["local"])
    assert _keys(bucket, prefix + "/") == _published_keys(manifest) | {f"{prefix}/latest.json"}


def test_the_stage_command_exits_75_naming_the_object(bucket: str, s3_server: str, tmp_path: Path) -> None:
    with FaultProxy(s3_server, FaultPlan(outage={"get": "/src/"})) as proxy:
        env = {**os.environ, **KNOBS, "AWS_ENDPOINT_URL": proxy.url, "GRAMLINE_S3_ATTEMPTS": "3"}
        cmd = [sys.executable, "-m", "gramline.stages.curate", *_argv(_sources(bucket), tmp_path / "out")]
        result = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == TRANSIENT_EXIT_CODE, result.stderr[-2000:]
    assert f"error: S3 get_object of s3://{bucket}/src/" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_rerun_removes_what_a_killed_publish_left(bucket: str, s3_server: str, clean: dict[str, Path],
                                                    tmp_path: Path) -> None:
    out, prefix = tmp_path / "out", "out-killed"
    args = (_sources(bucket), out, f"output.shards_uri=s3://{bucket}/{prefix}")
    pending = tmp_path / ".out.curate-work" / "publish.json"
    with FaultProxy(s3_server, FaultPlan(rates={"put": {"delay": 1.0}}, delay_s=0.3)) as proxy:
        env = {**os.environ, **KNOBS, "AWS_ENDPOINT_URL": proxy.url}
        proc = subprocess.Popen([sys.executable, "-m", "gramline.stages.curate", *_argv(*args)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300  # generous: the stage starts slowly on a loaded machine
        while not _keys(bucket, prefix + "/") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        finished_first = proc.poll()
        proc.kill()  # in the middle of the shard uploads
        proc.wait(timeout=30)
    assert finished_first is None, f"the publish ended (exit {finished_first}) before it could be killed mid-upload"
    assert pending.is_file() and _keys(bucket, prefix + "/")
    manifest = _run(*args)
    assert _fingerprint(out) == _fingerprint(clean["local"])
    assert _keys(bucket, prefix + "/") == _published_keys(manifest) | {f"{prefix}/latest.json"}


def test_concurrent_publishers_write_separate_complete_versions(bucket: str, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from gramline.curate.publish import publish_to_s3
    from gramline.data.synthetic import write_synthetic_dataset

    staged = tmp_path / "staged"
    write_synthetic_dataset(staged, n_train=24, n_eval=6, size=32, seed=1)
    for name in ("quarantine.parquet", "duplicates.parquet", "report.html"):
        (staged / name).write_bytes(b"")
    base = f"s3://{bucket}/concurrent"
    with ThreadPoolExecutor(4) as pool:
        manifests = list(pool.map(lambda i: publish_to_s3(staged, tmp_path / f"out{i}", base, tmp_path / f"p{i}.json"),
                                  range(4)))
    assert len({m["shards_uri"] for m in manifests}) == 4
    for m in manifests:
        for split, urls in m["shards"].items():
            rels = json.loads((staged / "manifest.json").read_text())["shards"][split]
            assert [_get(u) for u in urls] == [(staged / rel).read_bytes() for rel in rels]
        assert json.loads(_get(f"{m['shards_uri']}/manifest.json")) == m
    assert _keys(bucket, "concurrent/") == set().union(*map(_published_keys, manifests)) | {"concurrent/latest.json"}
    assert json.loads(_get(f"{base}/latest.json"))["version"] in {m["shards_uri"].rsplit("/", 1)[1] for m in manifests}


def test_botocore_keeps_retrying_after_many_failed_calls(bucket: str, through, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client-wide retry quota (botocore's standard/adaptive modes) runs dry after ~100 failed
    calls and retries nothing from then on; ours has none. botocore's sleeps are patched out."""
    import botocore.retryhandler

    from gramline.data import s3

    monkeypatch.setattr(botocore.retryhandler, "delay_exponential", lambda base, growth_factor, attempts: 0)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("GRAMLINE_S3_ATTEMPTS", "1")
    per_call = []
    with through(FaultPlan(outage={"get": "/"})) as proxy:
        for i in range(250):
            before = proxy.requests
            with pytest.raises(TransientError):
                s3.read_bytes(f"s3://{bucket}/nothing/{i}")
            per_call.append(proxy.requests - before)
    assert per_call == [3] * 250
