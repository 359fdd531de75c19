"""The benchmark stage end to end: real Dataset and Model artifacts, the real CLI, bad inputs."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gramline.artifacts import build_manifest, lineage_entry, write_manifest
from gramline.data.synthetic import write_synthetic_dataset
from gramline.data.writer import DatasetWriter, ShardSample
from gramline.models.archs import ARCHS
from gramline.models.io import BACKBONE_FILE, build_random_backbone, save_weights, timm_manifest_entry
from gramline.stages import benchmark

FAST = ["--set", "seg.steps=60", "--set", "linear.epochs=30", "--set", "dense.images=12", "--set", "report.images=4"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "shapes"
    write_synthetic_dataset(out, n_train=4, n_eval=64, size=64, seed=0)
    return out


def make_model_dir(out: Path, dataset: Path, seed: int, with_backbone: bool = True, state: dict | None = None) -> Path:
    """A Model artifact in the documented layout, from a seeded tiny backbone (or `state`), with a training log."""
    out.mkdir(parents=True)
    arch = ARCHS["tiny"]
    if with_backbone:
        save_weights(out / BACKBONE_FILE, state or build_random_backbone("tiny", 64, seed=seed).state_dict())
    rows = [{"step": s, "total": 10.0 - s / 10, "dino_global": 6.0 - s / 20, "lr": 1e-3} for s in range(0, 60, 10)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_manifest(out, build_manifest("Model", "pretrain", inputs=[lineage_entry("dataset", dataset)],
                                       timm=timm_manifest_entry(arch.timm_name, arch.timm_kwargs(64)),
                                       arch="tiny", step=50))
    return out


class Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.found.append(dict(attrs))


def images_in(html: str) -> list[dict[str, str]]:
    parser = Images()
    parser.feed(html)
    return parser.found


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "gramline.stages.benchmark", *args], capture_output=True, text=True, check=False,
                          env=env, timeout=600)


def test_stage_end_to_end_two_models(tmp_path: Path, shapes: Path) -> None:
    model = make_model_dir(tmp_path / "model", shapes, seed=1)
    out = tmp_path / "out"
    proc = run_cli(["--model", "rand=random:tiny", "--model", f"trained={model}", "--eval-dataset", str(shapes),
                    "--out-metrics", str(out / "metrics"), "--out-report", str(out / "report"),
                    "--out-html", str(out / "page.html"), "--out-markdown", str(out / "page.md"),
                    "--executor-output", str(out / "kfp" / "executor_output.json"),
                    "--output-uri", "metrics=s3://bucket/metrics", *FAST])
    assert proc.returncode == 0, proc.stderr
    assert "img/s" in proc.stdout and "ETA" in proc.stdout  # progress
    metrics = json.loads((out / "metrics" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"rand", "trained"}
    for name, values in metrics["models"].items():
        for key in ("knn_top1_k10", "knn_top1_k20", "linear_top1", "seg_miou", "corr_top1"):
            assert 0.0 <= values[key] <= 1.0, (name, key)
    assert metrics["reference"] == "rand"
    assert "gram_corr" in metrics["models"]["trained"] and "gram_corr" not in metrics["models"]["rand"]
    # executor output: the KFP Metrics metadata, flat scalars named <model>/<metric>
    kfp = json.loads((out / "kfp" / "executor_output.json").read_text())
    entry = kfp["artifacts"]["metrics"]["artifacts"][0]
    assert entry["uri"] == "s3://bucket/metrics" and entry["name"] == "metrics"
    assert entry["metadata"]["trained/knn_top1_k20"] == metrics["models"]["trained"]["knn_top1_k20"]
    assert entry["metadata"]["rand/seg_miou"] == metrics["models"]["rand"]["seg_miou"]
    assert set(kfp["artifacts"]) == {"metrics", "report", "report_md", "report_dir"}
    assert kfp["artifacts"]["report"]["artifacts"][0]["uri"] == str((out / "page.html").resolve())
    # the report: one PCA image per model, a similarity map each, curves for the Model artifact
    html = (out / "report" / "report.html").read_text()
    assert html == (out / "page.html").read_text()
    imgs = images_in(html)
    assert sorted(i["data-model"] for i in imgs if i["class"] == "pca") == ["rand", "trained"]
    assert sorted(i["data-model"] for i in imgs if i["class"] == "sim") == ["rand", "trained"]
    assert [i["data-model"] for i in imgs if i["class"] == "curves"] == ["trained"]
    assert "zero-shot skipped" in html and "pretrain" in html  # skip reason, lineage
    pca = Image.open(out / "report" / "images" / "pca_trained.png")
    assert pca.size == (4 * 96 + 3 * 4, 2 * 96 + 4)  # 4 images; image row + PCA row
    md = (out / "report" / "report.md").read_text()
    assert "| k-NN top-1 (k=20) |" in md and "**" in md
    for directory, kind in ((out / "metrics", "Metrics"), (out / "report", "Report")):
        manifest = json.loads((directory / "manifest.json").read_text())
        assert manifest["kind"] == kind and manifest["stage"] == "benchmark"
        assert {i["name"] for i in manifest["inputs"]} == {"eval_dataset", "rand", "trained"}


def _fail(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exc:
        benchmark.main_cli(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_model_dir_without_backbone_exits_2_naming_it(tmp_path: Path, shapes: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    broken = make_model_dir(tmp_path / "broken", shapes, seed=0, with_backbone=False)
    err = _fail(["--model", f"b={broken}", "--eval-dataset", str(shapes), "--out-metrics", str(tmp_path / "m"),
                 "--out-report", str(tmp_path / "r")], capsys)
    assert str(broken) in err and BACKBONE_FILE in err
    assert not (tmp_path / "m").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("spec, expected", [
    ("x=random:nosucharch", "nosucharch"),
    ("bad/name=random:tiny", "invalid name"),
    ("x=/does/not/exist", "/does/not/exist"),
    ("x=timm:vit_small_patch16_dinov3@/no/weights.safetensors", "/no/weights.safetensors"),
])
def test_bad_model_specs_exit_2(tmp_path: Path, shapes: Path, capsys: pytest.CaptureFixture, spec: str,
                                expected: str) -> None:
    err = _fail(["--model", spec, "--eval-dataset", str(shapes), "--out-metrics", str(tmp_path / "m"),
                 "--out-report", str(tmp_path / "r")], capsys)
    assert expected in err


def test_bad_config_and_reference_exit_2(tmp_path: Path, shapes: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["--model", "a=random:tiny", "--eval-dataset", str(shapes), "--out-metrics", str(tmp_path / "m"),
            "--out-report", str(tmp_path / "r")]
    assert "dense.reference" in _fail(base + ["--set", "dense.reference=zzz"], capsys)
    assert "test_fraction" in _fail(base + ["--set", "test_fraction=1.5"], capsys)
    assert "knn.nope" in _fail(base + ["--set", "knn.nope=1"], capsys)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(out: Path, sizes: list[int], labels: list[int], classes: list[str], splits=("eval",)) -> Path:
    rng = np.random.default_rng(0)
    with DatasetWriter(out, stage="test") as writer:
        for split in splits:
            for i, (size, label) in enumerate(zip(sizes, labels)):
                image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                image[: size // 2] = (40 * label) % 256  # a label-dependent band
                writer.add(split, ShardSample(key=f"{split}-{i:04d}", image=png(image), label=label))
        writer.close(classes=classes)
    return out


def test_unlabelled_eval_runs_label_free_diagnostics_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_dataset(tmp_path / "unlabelled", [48] * 10, [-1] * 10, [])
    code = benchmark.main(["--model", "a=random:tiny", "--model", "b=random:small", "--eval-dataset", str(data),
                           "--out-metrics", str(tmp_path / "m"), "--out-report", str(tmp_path / "r"), *FAST])
    assert code == 0
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert set(metrics["models"]["a"]) == {"corr_top1"}
    assert set(metrics["models"]["b"]) == {"corr_top1", "gram_corr", "gram_mse"}
    html = (tmp_path / "r" / "report.html").read_text()
    assert "no labels" in html and "only the label-free diagnostics ran" in html
    assert "no masks" in html  # the segmentation probe says why it did not run
    assert "resized to 64x64" in html  # 48px images for a 64px model


def test_mixed_image_sizes_are_resized_and_reported(tmp_path: Path) -> None:
    sizes = [40, 56] * 8
    data = write_dataset(tmp_path / "mixed", sizes, [i % 2 for i in range(16)], ["a", "b"])
    code = benchmark.main(["--model", "a=random:tiny", "--eval-dataset", str(data),
                           "--out-metrics", str(tmp_path / "m"), "--out-report", str(tmp_path / "r"), *FAST])
    assert code == 0
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert {"knn_top1_k10", "knn_top1_k20", "linear_top1"} <= set(metrics["models"]["a"])
    assert any("2 sizes" in note and "40x40" in note for note in metrics["notes"])
    assert any("Gram similarity skipped" in note for note in metrics["notes"])


def test_eval_dataset_without_eval_split_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_dataset(tmp_path / "trainonly", [32] * 4, [0, 1, 0, 1], ["a", "b"], splits=("train",))
    err = _fail(["--model", "a=random:tiny", "--eval-dataset", str(data), "--out-metrics", str(tmp_path / "m"),
                 "--out-report", str(tmp_path / "r")], capsys)
    assert str(data) in err and "eval" in err
    assert not (tmp_path / "m").exists()


def test_missing_dataset_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = _fail(["--model", "a=random:tiny", "--eval-dataset", str(tmp_path / "nope"), "--out-metrics",
                 str(tmp_path / "m"), "--out-report", str(tmp_path / "r")], capsys)
    assert str(tmp_path / "nope") in err


def test_digits_dataset_reports_knn_and_linear(tmp_path: Path) -> None:
    from gramline.data.digits import write_digits_dataset

    data = tmp_path / "digits"
    write_digits_dataset(data, size=32)
    code = benchmark.main(["--model", "a=random:tiny", "--eval-dataset", str(data), "--out-metrics",
                           str(tmp_path / "m"), "--out-report", str(tmp_path / "r"), "--set", "max_images=400", *FAST])
    assert code == 0
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    a = metrics["models"]["a"]
    for key in ("knn_top1_k10", "knn_top1_k20", "linear_top1"):
        assert 0.0 <= a[key] <= 1.0
    assert metrics["dataset"]["classes"] == 10 and metrics["dataset"]["eval images"] == 400
    assert metrics["dataset"]["size"] == "32x32"


@pytest.mark.slow
def test_benchmark_of_the_tiny_pretrain_and_random_init(tiny_pretrain_run: tuple[Path, Path], tmp_path: Path) -> None:
    """The two-model tiny benchmark on the README's main job (the probes' quality margins live in
    test_pretrain_quality: at this scale the tiny model does not beat random init yet)."""
    data, model = tiny_pretrain_run
    proc = run_cli(["--model", "random=random:tiny", "--model", f"pretrained={model}", "--eval-dataset", str(data),
                    "--out-metrics", str(tmp_path / "metrics"), "--out-report", str(tmp_path / "report")])
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "metrics" / "metrics.json").read_text())["models"]
    for name in ("pretrained", "random"):
        for key in ("knn_top1_k20", "linear_top1", "seg_miou"):
            assert 0.0 <= metrics[name][key] <= 1.0, (name, key, metrics[name])
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 2  # a PCA map per model at least


# --------------------------------------------------------------------------- --start-model (pretrain --init-from)


@pytest.fixture(scope="module")
def start_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    """A tiny "public" backbone (random weights away from init), as an official DINOv3 checkpoint
    and as a safetensors file for its timm class: (state dict, checkpoint, safetensors)."""
    import timm
    import torch
    from safetensors.torch import save_file

    from gramline.models.formats import write_official_checkpoint

    arch = ARCHS["tiny"]
    vit = timm.create_model(arch.timm_name, pretrained=False, **arch.timm_kwargs(64))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in vit.parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(noise * 0.1 if param.ndim > 1 else 0.5 + 0.3 * noise)
    state = {k: v.detach().clone().contiguous() for k, v in vit.state_dict().items()}
    root = tmp_path_factory.mktemp("start")
    write_official_checkpoint(root / "teacher_checkpoint.pth", state, "tiny")
    save_file(state, str(root / "tiny.safetensors"))
    return state, root / "teacher_checkpoint.pth", root / "tiny.safetensors"


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "small_eval"
    write_synthetic_dataset(out, n_train=32, n_eval=16, size=32, seed=0)
    return out


TINY_START = ["--preset", "tiny", "--set", "max_images=16", "--set", "seg.steps=10", "--set", "linear.epochs=5",
              "--set", "dense.images=8", "--set", "report.images=2"]


def test_start_model_is_compared_and_is_the_gram_reference(tmp_path: Path, small_eval: Path,
                                                           start_weights: tuple[dict, Path, Path]) -> None:
    """--start-model CHECKPOINT adds the model `start` (loaded through the --init-from resolver) and makes
    it the Gram reference: a Model with the very same backbone matches it exactly, a random init does not."""
    state, checkpoint, _ = start_weights
    same = make_model_dir(tmp_path / "same", small_eval, seed=0, state=state)
    out = tmp_path / "out"
    code = benchmark.main(["--model", f"same={same}", "--model", "rand=random:tiny", "--start-model", str(checkpoint),
                           "--eval-dataset", str(small_eval), "--out-metrics", str(out / "m"),
                           "--out-report", str(out / "r"), *TINY_START])
    assert code == 0
    metrics = json.loads((out / "m" / "metrics.json").read_text())
    models = metrics["models"]
    assert set(models) == {"same", "rand", "start"}
    assert metrics["reference"] == "start" and metrics["config"]["dense"]["reference"] == "start"
    assert "gram_corr" not in models["start"] and "gram_mse" not in models["start"]  # not compared with itself
    assert models["same"]["gram_corr"] == pytest.approx(1.0, abs=1e-6)
    assert models["same"]["gram_mse"] == pytest.approx(0.0, abs=1e-9)
    assert models["rand"]["gram_corr"] < 0.99
    assert "checkpoint" in metrics["details"]["start"]["spec"]
    pca = [i["data-model"] for i in images_in((out / "r" / "report.html").read_text()) if i["class"] == "pca"]
    assert sorted(pca) == ["rand", "same", "start"]


def test_start_model_keeps_a_reference_the_config_names(tmp_path: Path, small_eval: Path,
                                                        start_weights: tuple[dict, Path, Path]) -> None:
    """With dense.reference set, `start` (here timm:<class>@<safetensors>) is one more compared model."""
    state, _, weights = start_weights
    same = make_model_dir(tmp_path / "same", small_eval, seed=0, state=state)
    out = tmp_path / "out"
    code = benchmark.main(["--model", f"same={same}", "--start-model", f"timm:{ARCHS['tiny'].timm_name}@{weights}",
                           "--eval-dataset", str(small_eval), "--out-metrics", str(out / "m"),
                           "--out-report", str(out / "r"), *TINY_START, "--set", "dense.reference=same"])
    assert code == 0
    metrics = json.loads((out / "m" / "metrics.json").read_text())
    assert metrics["reference"] == "same" and "gram_corr" not in metrics["models"]["same"]
    assert metrics["models"]["start"]["gram_corr"] == pytest.approx(1.0, abs=1e-6)


def test_empty_start_model_adds_nothing_and_a_clashing_name_exits_2(tmp_path: Path, small_eval: Path,
                                                                    start_weights: tuple[dict, Path, Path],
                                                                    capsys: pytest.CaptureFixture) -> None:
    _, checkpoint, _ = start_weights
    base = ["--eval-dataset", str(small_eval), "--out-metrics", str(tmp_path / "m"), "--out-report", str(tmp_path / "r")]
    err = _fail(["--model", "start=random:tiny", "--start-model", str(checkpoint), *base], capsys)
    assert "--model start=random:tiny" in err and "--start-model" in err
    err = _fail(["--model", "a=random:tiny", "--start-model", str(tmp_path / "missing.pth"), *base], capsys)
    assert "missing.pth" in err
    assert not (tmp_path / "m").exists()
    code = benchmark.main(["--model", "a=random:tiny", "--model", "b=random:micro", "--start-model", "", *base,
                           *TINY_START])
    assert code == 0
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"a", "b"} and metrics["reference"] == "a"
