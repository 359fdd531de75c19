"""The curate stage end to end: a messy mixed collection (folders, tar, manifest, S3 prefix),
injected duplicates, a skewed collection, the S3 round trip, resume after a kill, bad sources.

S3 is moto's real server on 127.0.0.1 (the `s3_server` fixture sets AWS_ENDPOINT_URL).
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw
from test_curate_dedup import make_copy, pair_precision_recall, scene
from test_curate_validate import _png_header_only

from gramline.curate.embed import build_embedder
from gramline.data.reader import iter_samples, open_dataset
from gramline.stages import curate as stage

REPO = Path(__file__).resolve().parents[1]


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _bucket(hint: str) -> str:
    name = f"{hint}-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def _run(sources: list[str], out: Path, *overrides: str, executor_output: Path | None = None) -> dict:
    argv = [a for s in sources for a in ("--source", s)] + ["--out-dataset", str(out)]
    for item in overrides:
        argv += ["--set", item]
    if executor_output is not None:
        argv += ["--executor-output", str(executor_output)]
    assert stage.main(argv) == 0
    return json.loads((out / "manifest.json").read_text())


def _odd_modes(rng: np.random.Generator) -> dict[str, bytes]:
    base = scene(rng, 96, 80)
    rgba = base.convert("RGBA")
    rgba.putalpha(200)
    exif = Image.Exif()
    exif[0x0112] = 6
    grey16 = Image.new("I;16", (90, 70))
    grey16.frombytes((np.asarray(base.convert("L"), dtype=np.uint16)[:70, :90] * 257).astype("<u2").tobytes())
    return {
        "palette.png": _save(scene(rng, 90, 90).convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0),
        "la.png": _save(scene(rng, 90, 90).convert("LA"), "PNG"),
        "rgba.png": _save(rgba, "PNG"),
        "cmyk.jpg": _save(scene(rng, 90, 90).convert("CMYK"), "JPEG", quality=92),
        "grey16.png": _save(grey16, "PNG"),
        "grey.png": _save(scene(rng, 90, 90).convert("L"), "PNG"),
        "rotated.jpg": _save(scene(rng, 120, 80), "JPEG", quality=92, exif=exif.tobytes()),
    }


def _mixed_collection(root: Path, bucket: str) -> tuple[list[str], dict[str, str], int]:
    """Sources, {location suffix: expected quarantine reason}, number of good images."""
    rng = np.random.default_rng(11)
    good = 0
    folder = root / "folder"
    (folder / "a" / "b").mkdir(parents=True)
    for i in range(30):
        sub = folder / ("a/b" if i % 3 == 0 else "a" if i % 3 == 1 else ".")
        fmt = "JPEG" if i % 2 else "PNG"
        (sub / f"img{i:02d}.{'jpg' if i % 2 else 'png'}").write_bytes(_save(scene(rng, 100, 90), fmt))
        good += 1
    (folder / "a" / "no_extension").write_bytes(_save(scene(rng, 100, 90), "PNG"))
    good += 1
    for name, data in _odd_modes(rng).items():
        (folder / "a" / "b" / name).write_bytes(data)
        good += 1
    jpeg = _save(scene(rng, 120, 100), "JPEG", quality=90)
    png = _save(scene(rng, 120, 100), "PNG")
    bad = {
        "folder/empty.png": ("zero-byte", b""),
        "folder/notes.txt": ("non-image", b"these are not pixels\n" * 20),
        "folder/a/truncated.jpg": ("truncated", jpeg[: len(jpeg) // 2]),
        "folder/a/truncated.png": ("truncated", png[: len(png) // 3]),
        "folder/a/b/corrupt.png": ("corrupt", png[:50] + bytes(len(png) - 50)),
        "folder/tiny.png": ("too-small", _save(scene(rng, 10, 10), "PNG")),
        "folder/bomb.png": ("too-many-pixels", _png_header_only(100_000, 100_000)),
    }
    expected: dict[str, str] = {}
    for rel, (reason, data) in bad.items():
        (root / rel).write_bytes(data)
        expected[str(root / rel)] = reason

    tar_path = root / "bundle.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in [("t/good1.png", _save(scene(rng, 100, 90), "PNG")),
                           ("t/good2.jpg", _save(scene(rng, 100, 90), "JPEG")),
                           ("../escape.png", _save(scene(rng, 100, 90), "PNG")),
                           ("/etc/abs.png", _save(scene(rng, 100, 90), "PNG")),
                           ("t/corrupt.jpg", jpeg[:20] + bytes(300))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    good += 2
    expected[f"{tar_path}#../escape.png"] = "path-traversal"
    expected[f"{tar_path}#/etc/abs.png"] = "path-traversal"
    expected[f"{tar_path}#t/corrupt.jpg"] = "corrupt"

    listed = root / "listed"
    listed.mkdir()
    for i in range(6):
        (listed / f"l{i}.png").write_bytes(_save(scene(rng, 100, 90), "PNG"))
        good += 1
    pq.write_table(pa.table({"path": [f"listed/l{i}.png" for i in range(6)] + ["listed/gone.png"],
                             "caption": [f"listed image {i}" for i in range(7)]}), root / "list.parquet")
    expected[str(root / "listed" / "gone.png")] = "unreadable"

    client = boto3.client("s3")
    for i in range(8):
        client.put_object(Bucket=bucket, Key=f"raw/s{i}.png", Body=_save(scene(rng, 100, 90), "PNG"))
        good += 1
    client.put_object(Bucket=bucket, Key="raw/broken.jpg", Body=jpeg[: len(jpeg) // 2])
    expected[f"s3://{bucket}/raw/broken.jpg"] = "truncated"
    sources = [str(folder), str(tar_path), str(root / "list.parquet"), f"s3://{bucket}/raw"]
    return sources, expected, good


def test_mixed_collection_is_curated_and_every_bad_file_quarantined(s3_server: str, tmp_path: Path) -> None:
    bucket = _bucket("mixed")
    sources, expected, n_good = _mixed_collection(tmp_path / "in", bucket)
    out = tmp_path / "out"
    eo = tmp_path / "executor_output.json"
    manifest = _run(sources, out, "balance.target=1.0", "dedup.near=false", executor_output=eo)

    quarantine = pq.read_table(out / "quarantine.parquet").to_pylist()
    got = {row["location"]: row["reason"] for row in quarantine}
    assert got == expected
    info = open_dataset(out)
    assert info.splits["train"] + info.splits["eval"] == n_good
    samples = list(iter_samples(out, "train")) + list(iter_samples(out, "eval"))
    assert all(s["image"].mode == "RGB" for s in samples)
    by_source = {s["meta"]["source"]: s for s in samples}
    rotated = next(v for k, v in by_source.items() if k.endswith("rotated.jpg"))
    assert rotated["image"].size == (80, 120)  # EXIF orientation 6 applied: 120x80 stored -> 80x120
    listed = [s for k, s in by_source.items() if "/listed/" in k]
    assert len(listed) == 6 and all(s["caption"].startswith("listed image") for s in listed)
    assert sum(k.startswith(f"s3://{bucket}/") for k in by_source) == 8
    assert sum("bundle.tar#" in k for k in by_source) == 2

    stats = json.loads((out / "stats.json").read_text())
    funnel = stats["funnel"]
    assert funnel["seen"] == n_good + len(expected)
    assert funnel["quarantined"] == len(expected) and funnel["decoded"] == n_good
    assert funnel["kept"] == n_good and funnel["eval"] == manifest["splits"]["eval"]
    assert sum(stats["quarantine"].values()) == len(expected)
    metadata = json.loads(eo.read_text())["artifacts"]["dataset"]["artifacts"][0]["metadata"]
    assert metadata["counts"] == funnel and metadata["quarantine"] == stats["quarantine"]
    assert sum(metadata["cluster_sizes_before"]) == funnel["train_pool"]
    assert len(metadata["shard_bytes"]["train"]) == len(manifest["shards"]["train"])
    html = (out / "report.html").read_text()
    assert "Funnel" in html and "data:image/jpeg;base64," in html
    assert not list(tmp_path.glob(".out.curate-work*"))  # work directory removed after success


def test_stage_finds_injected_duplicates(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    folder = tmp_path / "dups"
    folder.mkdir()
    origin: dict[str, int] = {}
    originals = [scene(rng, int(rng.integers(110, 200)), int(rng.integers(110, 200))) for _ in range(90)]
    for i, image in enumerate(originals):
        (folder / f"o{i:03d}.png").write_bytes(_save(image, "PNG"))
        origin[f"o{i:03d}.png"] = i
    kinds = ["resize", "jpeg", "crop", "all"]
    for n, i in enumerate(range(0, 90, 3)):
        if n % 5 == 0:  # exact: the same pixels in another container
            (folder / f"c{n:03d}.bmp").write_bytes(_save(originals[i], "BMP"))
            origin[f"c{n:03d}.bmp"] = i
        else:
            (folder / f"c{n:03d}.jpg").write_bytes(_save(make_copy(rng, originals[i], kinds[n % 4]), "JPEG"))
            origin[f"c{n:03d}.jpg"] = i
    out = tmp_path / "out"
    _run([str(folder)], out, "split.eval_fraction=0", "balance.target=1.0")
    dups = pq.read_table(out / "duplicates.parquet").to_pylist()
    kept = [row["source"] for row in pq.read_table(out / "index.parquet").to_pylist()]
    component = {Path(p).name: Path(p).name for p in kept}
    for row in dups:
        component[Path(row["location"]).name] = Path(row["duplicate_of_location"]).name
    names = sorted(origin)
    labels = np.unique([component[n] for n in names], return_inverse=True)[1]
    precision, recall = pair_precision_recall(labels, np.array([origin[n] for n in names]))
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    kinds_found = {row["kind"] for row in dups}
    assert kinds_found == {"exact", "near"}
    # near-dup representatives are the largest image, then the largest file (the PNG original over
    # a same-size JPEG copy); exact copies have the same pixels as their original, and the first
    # in ingest order (c*.bmp sorts before o*.png) is kept
    assert all(Path(p).name.startswith("o") or Path(p).suffix == ".bmp" for p in kept)


def _concept(rng: np.random.Generator, concept: int) -> Image.Image:
    """Six visually distinct concepts: a background colour and a shape colour per concept, 1-3
    small discs at random places."""
    palettes = [((200, 40, 40), (250, 220, 60)), ((40, 160, 60), (20, 40, 120)), ((40, 70, 200), (240, 240, 240)),
                ((230, 230, 230), (30, 30, 30)), ((120, 60, 160), (60, 200, 200)), ((20, 20, 20), (250, 140, 30))]
    bg, fg = palettes[concept]
    image = Image.new("RGB", (96, 96), bg)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        x, y, r = int(rng.integers(0, 80)), int(rng.integers(0, 80)), int(rng.integers(6, 14))
        draw.ellipse([x, y, x + r, y + r], fill=fg)
    noisy = np.asarray(image).astype(np.int16) + rng.integers(-10, 11, (96, 96, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def test_balanced_sampling_flattens_a_skewed_collection(tmp_path: Path) -> None:
    sizes = [160, 80, 40, 20, 10, 6]
    rng = np.random.default_rng(4)
    folder = tmp_path / "skewed"
    folder.mkdir()
    for concept, n in enumerate(sizes):
        for i in range(n):
            (folder / f"c{concept}_{i:03d}.png").write_bytes(_save(_concept(rng, concept), "PNG"))
    out = tmp_path / "out"
    # as many top-level clusters as concepts (the tiny preset's auto levels would give [16, 3])
    _run([str(folder)], out, "split.eval_fraction=0", "balance.target=60", "cluster.levels=[24,6]")
    rows = pq.read_table(out / "index.parquet").to_pylist()
    assert len(rows) == 60
    # by true concept
    after = np.bincount([int(Path(r["source"]).name[1]) for r in rows], minlength=6)
    before = np.asarray(sizes)
    ratio_before, ratio_after = before.max() / before.min(), after.max() / max(after.min(), 1)
    assert ratio_before / ratio_after >= 5, (after.tolist(), ratio_before, ratio_after)
    # by found top-level cluster, as reported
    summary = json.loads((out / "stats.json").read_text())["clusters"]
    assert summary["summary_before"]["max_over_min"] / summary["summary_after"]["max_over_min"] >= 5
    assert all(r["cluster"].count("/") == 1 for r in rows)  # "top/leaf" cluster path per sample


def _samples_by_key(path: Path, split: str) -> dict[str, tuple]:
    return {s["key"]: (np.asarray(s["image"]).tobytes(), s["label"], s["caption"], s["meta"]["cluster"])
            for s in iter_samples(path, split)}


def test_s3_round_trip_matches_local(s3_server: str, tmp_path: Path) -> None:
    bucket = _bucket("roundtrip")
    client = boto3.client("s3")
    rng = np.random.default_rng(9)
    for i in range(20):
        client.put_object(Bucket=bucket, Key=f"in/x{i:02d}.png", Body=_save(scene(rng, 80, 80), "PNG"))
    sources = ["synthetic:n=150,size=48,seed=3", f"s3://{bucket}/in"]
    common = ["output.max_count=40"]
    local = tmp_path / "local"
    remote = tmp_path / "remote"
    _run(sources, local, *common)
    manifest = _run(sources, remote, *common, f"output.shards_uri=s3://{bucket}/datasets/v1")

    assert not (remote / "shards").exists()
    root = manifest["shards_uri"]
    assert root.startswith(f"s3://{bucket}/datasets/v1/versions/")
    assert all(u.startswith(f"{root}/shards/") for urls in manifest["shards"].values() for u in urls)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="datasets/v1/")["Contents"]}
    version = root.removeprefix(f"s3://{bucket}/")
    shard_keys = {u.removeprefix(f"s3://{bucket}/") for urls in manifest["shards"].values() for u in urls}
    assert keys == shard_keys | {f"{version}/{n}" for n in ("manifest.json", "index.parquet", "stats.json")} | {
        "datasets/v1/latest.json"}
    published = json.loads(client.get_object(Bucket=bucket, Key=f"{version}/manifest.json")["Body"].read())
    assert published == manifest
    local_index = pq.read_table(local / "index.parquet").drop_columns(["shard"])
    remote_index = pq.read_table(remote / "index.parquet")
    assert remote_index.drop_columns(["shard"]).equals(local_index)
    assert all(s.startswith("s3://") for s in remote_index.column("shard").to_pylist())

    # training streams the shards back from s3:// through ShardStream (boto3 opener)
    def stream(path: Path) -> list[tuple]:
        info = open_dataset(path)
        return [(s["key"], np.asarray(s["image"]).tobytes(), s["label"], s["caption"])
                for s in info.stream("train", mode="epoch", shuffle_buffer=0)]

    from_s3, from_disk = stream(remote), stream(local)
    assert open_dataset(remote).shard_urls("train")[0].startswith("s3://")
    assert len(from_s3) == manifest["splits"]["train"] > 0
    assert from_s3 == from_disk
    assert _samples_by_key(remote, "eval") == _samples_by_key(local, "eval")


def _curate_cmd(sources: list[str], out: Path, *overrides: str) -> list[str]:
    cmd = [sys.executable, "-m", "gramline.stages.curate", "--out-dataset", str(out)]
    for s in sources:
        cmd += ["--source", s]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def _kill_when(cmd: list[str], marker_glob: tuple[Path, str], timeout: float = 120) -> str:
    """Start `cmd`, SIGKILL it as soon as a file matching the glob appears; returns its stderr."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root, pattern = marker_glob
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if list(root.glob(pattern)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=60)
    return err


def _dataset_fingerprint(path: Path) -> dict:
    manifest = json.loads((path / "manifest.json").read_text())
    stats = json.loads((path / "stats.json").read_text())
    stats.pop("timings_s")
    shards = {rel: (path / rel).read_bytes() for rels in manifest["shards"].values() for rel in rels}
    for name in ("created_at", "inputs"):
        manifest.pop(name)
    return {"manifest": manifest, "stats": stats, "shards": shards,
            "index": pq.read_table(path / "index.parquet").to_pylist(),
            "duplicates": pq.read_table(path / "duplicates.parquet").to_pylist()}


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_output(tmp_path: Path) -> None:
    sources = ["synthetic:n=360,size=48,seed=5"]
    overrides = ["ingest.chunk_size=40", "ingest.workers=1", "output.max_count=100"]
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    subprocess.run(_curate_cmd(sources, clean, *overrides), cwd=REPO, check=True, capture_output=True)
    work = tmp_path / ".resumed.curate-work"
    # kill 1: during ingest, once two chunks are complete
    _kill_when(_curate_cmd(sources, resumed, *overrides), (work / "ingest", "chunk-000001.parquet"))
    assert not (resumed / "manifest.json").exists()
    done_before = len(list((work / "ingest").glob("chunk-*.parquet")))
    assert 2 <= done_before < 9
    # kill 2: after clustering, while shards are being written
    err = _kill_when(_curate_cmd(sources, resumed, *overrides), (resumed / "shards", "*.tar*"))
    assert f"resuming after {done_before} complete chunk(s)" in err
    finish = subprocess.run(_curate_cmd(sources, resumed, *overrides), cwd=REPO, capture_output=True, text=True,
                            check=False)
    assert finish.returncode == 0, finish.stderr
    assert _dataset_fingerprint(resumed) == _dataset_fingerprint(clean)
    assert not work.exists()


@pytest.mark.parametrize("case", ["missing", "empty_bucket", "unreadable_manifest", "no_path_column"])
def test_bad_sources_exit_2_naming_the_source(case: str, tmp_path: Path, request, capsys) -> None:
    if case == "missing":
        uri, words = str(tmp_path / "no-such-dir"), "does not exist"
    elif case == "empty_bucket":
        request.getfixturevalue("s3_server")
        uri, words = f"s3://{_bucket('void')}", "no objects"
    elif case == "unreadable_manifest":
        (tmp_path / "m.parquet").write_bytes(b"PAR1 garbage")
        uri, words = str(tmp_path / "m.parquet"), "not a readable parquet manifest"
    else:
        pq.write_table(pa.table({"name": ["a.png"]}), tmp_path / "m.parquet")
        uri, words = str(tmp_path / "m.parquet"), "has no path column"
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        stage.main_cli(["--source", "synthetic:n=5", "--source", uri, "--out-dataset", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert uri in err and words in err
    assert not out.exists() and not list(tmp_path.glob(".out.curate-work*"))


def test_bad_config_exits_2(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        stage.main_cli(["--source", "synthetic:n=5", "--out-dataset", str(tmp_path / "o"),
                        "--set", "dedup.threshold=1.5"])
    assert exit_info.value.code == 2
    assert "dedup.threshold" in capsys.readouterr().err


def test_embed_backends() -> None:
    images = [_save(scene(np.random.default_rng(i), 64, 48), "PNG") for i in range(5)]
    layout = build_embedder("layout").embed(images)
    assert layout.shape == (5, 192) and np.abs(layout).max() <= 1
    # the layout of a flat colour is that colour's YCbCr, scaled to [-1, 1]
    flat = build_embedder("layout").embed([_save(Image.new("RGB", (32, 32), (255, 255, 255)), "PNG")])
    assert np.allclose(flat.reshape(64, 3), [(255 - 128) / 128, 0, 0], atol=1e-6)
    net = build_embedder("timm:vit_small_patch16_dinov3_qkvb", img_size=32, batch_size=2,
                         kwargs={"embed_dim": 48, "depth": 2, "num_heads": 3, "patch_size": 8, "img_size": 32})
    emb = net.embed(images)
    assert emb.shape == (5, 48) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert np.array_equal(emb, net.embed(images))
    from gramline.errors import InputError

    with pytest.raises(InputError, match="weights file"):
        build_embedder("timm:vit_small_patch16_dinov3_qkvb", weights="/nonexistent/w.safetensors")


TINY_VIT = {"embed_dim": 48, "depth": 2, "num_heads": 3, "patch_size": 8, "img_size": 32}


def test_decoding_on_several_threads_gives_the_same_embeddings_in_order() -> None:
    images = [_save(scene(np.random.default_rng(i), 40 + 7 * i, 48), "JPEG") for i in range(9)]
    one = build_embedder("timm:vit_small_patch16_dinov3_qkvb", img_size=32, batch_size=4, kwargs=TINY_VIT, workers=1)
    four = build_embedder("timm:vit_small_patch16_dinov3_qkvb", img_size=32, batch_size=4, kwargs=TINY_VIT, workers=4)
    four.model.load_state_dict(one.model.state_dict())  # the same random weights
    assert np.array_equal(one.embed(images), four.embed(images))


@pytest.mark.parametrize(("device", "expected"), [("tpu", "auto, cpu, cuda or cuda:N"), ("cuda", "has none")])
def test_an_embedding_device_the_task_lacks_exits_2_naming_it(device: str, expected: str, tmp_path: Path,
                                                              capsys) -> None:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exit_info:
        stage.main_cli(["--source", "synthetic:n=5", "--out-dataset", str(tmp_path / "out"),
                        "--set", "embed.backbone=timm:vit_small_patch16_dinov3_qkvb", "--set", f"embed.device={device}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "embed.device" in err and expected in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a GPU")
def test_gpu_embeddings_in_bf16_agree_with_the_cpu() -> None:
    images = [_save(scene(np.random.default_rng(i), 64, 48), "PNG") for i in range(16)]
    cpu = build_embedder("timm:vit_small_patch16_dinov3_qkvb", img_size=32, kwargs=TINY_VIT, device="cpu")
    gpu = build_embedder("timm:vit_small_patch16_dinov3_qkvb", img_size=32, kwargs=TINY_VIT, device="cuda")
    gpu.model.load_state_dict(cpu.model.state_dict())
    assert float(np.min(np.sum(cpu.embed(images) * gpu.embed(images), axis=1))) > 0.99  # cosine, bf16


def test_model_artifact_embedder_matches_its_timm_model(tmp_path: Path) -> None:
    import torch

    from gramline.artifacts import build_manifest, write_manifest
    from gramline.models.io import BACKBONE_FILE, build_timm, save_weights

    name = "vit_small_patch16_dinov3_qkvb"
    kwargs = {"embed_dim": 48, "depth": 2, "num_heads": 3, "patch_size": 8, "img_size": 32, "num_classes": 0}
    torch.manual_seed(0)
    model = build_timm(name, kwargs).eval()
    save_weights(tmp_path / BACKBONE_FILE, model.state_dict())
    write_manifest(tmp_path, build_manifest("Model", "pretrain", timm={"name": name, "kwargs": kwargs}))
    images = [_save(scene(np.random.default_rng(i), 40, 40), "PNG") for i in range(3)]
    emb = build_embedder(f"model:{tmp_path}", img_size=32).embed(images)
    # the same preprocessing by hand: 40 px -> 32 px bicubic, ImageNet normalisation, pooled output
    batch = np.stack([np.asarray(Image.open(io.BytesIO(d)).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC))
                      for d in images]).astype(np.float32) / 255
    x = (torch.from_numpy(batch).permute(0, 3, 1, 2) - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(model(x), dim=-1).numpy()
    assert np.allclose(emb, expected, atol=1e-5)


def test_unloadable_embedder_fails_before_any_work(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        stage.main_cli(["--source", "synthetic:n=5", "--out-dataset", str(out),
                        "--set", "embed.backbone=model:/nonexistent/model"])
    assert exit_info.value.code == 2
    assert "/nonexistent/model" in capsys.readouterr().err
    assert not list(tmp_path.glob(".out.curate-work*"))


def test_timm_embeddings_drive_the_stage(tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = _run(["synthetic:n=60,size=32,seed=1"], out, "embed.backbone=timm:vit_small_patch16_dinov3_qkvb",
                    "embed.img_size=32", "embed.kwargs={embed_dim: 48, depth: 2, num_heads: 3, patch_size: 8, img_size: 32}",
                    "ingest.chunk_size=16", "output.keep_work=true")
    work = tmp_path / ".out.curate-work"
    assert len(list((work / "embed").glob("emb-*.npy"))) == 4  # one embedding file per ingest chunk
    funnel = json.loads((out / "stats.json").read_text())["funnel"]
    assert manifest["splits"]["train"] == funnel["train"] == round(0.8 * funnel["train_pool"])
    # the shapes world keeps its class order, so labels agree with its segmentation masks
    from gramline.data.synthetic import CLASSES, render_sample

    assert manifest["classes"] == list(CLASSES)
    for sample in iter_samples(out, "eval"):
        index = int(sample["meta"]["source"].rsplit("=", 1)[1])
        truth = render_sample(1, index, 32)
        assert sample["label"] == truth.label and sample["label_name"] == CLASSES[truth.label]
        assert np.array_equal(sample["mask"], truth.mask)


def _tiny_vit_weights(path: Path) -> str:
    import torch
    from safetensors.torch import save_file

    from gramline.models.io import load_timm_backbone

    torch.manual_seed(0)
    model = load_timm_backbone("vit_small_patch16_dinov3_qkvb", **TINY_VIT)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def test_embedding_in_the_partitions_gives_the_reduces_dataset(tmp_path: Path, capsys) -> None:
    """embed.where=partitions: each partition embeds its valid images, and the reduce, which loads no
    model, clusters the same vectors (one image a batch: bit-equal) into the same dataset."""
    weights = _tiny_vit_weights(tmp_path / "vit.safetensors")
    common = ["embed.backbone=timm:vit_small_patch16_dinov3_qkvb", f"embed.weights={weights}", "embed.img_size=32",
              "embed.kwargs={embed_dim: 48, depth: 2, num_heads: 3, patch_size: 8, img_size: 32}",
              "embed.batch_size=1", "ingest.chunk_size=16", "partition.count=3"]
    source = ["synthetic:n=60,size=32,seed=1"]
    _run(source, tmp_path / "reduce", *common)
    capsys.readouterr()
    _run(source, tmp_path / "parts", *common, "embed.where=partitions", "output.keep_work=true")
    err = capsys.readouterr().err
    assert "embed (timm:vit_small_patch16_dinov3_qkvb) [2]" in err and "computed in the partitions" in err
    stored = sorted((tmp_path / ".parts.curate-work" / "ingest").glob("part-*/chunk-*.emb.npy"))
    assert len(stored) == 6 and all(np.load(f).shape[1] == 48 for f in stored)
    for name in ("index", "duplicates", "quarantine"):
        assert pq.read_table(tmp_path / "parts" / f"{name}.parquet").equals(
            pq.read_table(tmp_path / "reduce" / f"{name}.parquet")), name


def test_a_reduce_embedding_in_the_partitions_refuses_partitions_that_did_not(tmp_path: Path) -> None:
    from gramline.config import load_stage_config
    from gramline.curate import pipeline as cp
    from gramline.curate.config import CurateConfig
    from gramline.errors import InputError

    source = ["synthetic:n=20,size=32,seed=1"]
    cfg = load_stage_config(CurateConfig, "curate", "tiny", None, ["partition.count=2", "ingest.workers=1"])
    roots = [tmp_path / f"p{p.index}" for p in cp.plan(source, cfg).partitions]
    for partition, root in zip(cp.plan(source, cfg).partitions, roots):
        cp.run_partition(source, cfg, partition, root)
    embedding = cfg.model_copy(update={"embed": cfg.embed.model_copy(
        update={"backbone": "timm:vit_small_patch16_dinov3_qkvb", "where": "partitions"})})
    with pytest.raises(InputError, match=r"partition output .*p0: holds no timm:vit_small_patch16_dinov3_qkvb embeddings"):
        cp.reduce(source, embedding, roots, tmp_path / "out")

