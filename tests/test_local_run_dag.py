"""The whole tiny DAG in process mode, from the YAML that `pipeline/compile.py` writes, through
`gramline run --pipeline FILE --runner process` (kfp.local, no Docker), and its outputs: a Dataset,
Models that plain timm loads, benchmark metrics and the HTML/Markdown report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("kfp")

REPO = Path(__file__).resolve().parents[1]


def compile_tiny(directory: Path) -> Path:
    out = directory / "gramline.yaml"
    done = subprocess.run([sys.executable, str(REPO / "pipeline" / "compile.py"), "--preset", "tiny", "--output",
                           str(out)], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out


def run_dag(pipeline: Path, root: Path, runner: str, *extra: str, timeout: int = 1500) -> Path:
    done = subprocess.run([sys.executable, "-c", "from gramline.cli import main; main()", "run", "--pipeline",
                           str(pipeline), "--runner", runner, "--root", str(root), *extra],
                          check=False, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    runs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("gramline-")]
    assert len(runs) == 1
    assert f"outputs in {runs[0]}" in done.stdout
    return runs[0]


def check_dag_outputs(run_dir: Path) -> None:
    """Every task's outputs, checked against the artifact formats of docs/architecture.md."""
    import timm
    import torch

    from gramline.kfp.pipeline import active_stages

    models = [s.name for s in active_stages() if s.produces_model]
    tasks = {p.name for p in run_dir.iterdir() if (p / "executor_output.json").is_file()}
    assert tasks == {"curate-plan", "curate", *models, "benchmark"}
    for task in tasks:  # the executor output names each artifact with its URI
        written = json.loads((run_dir / task / "executor_output.json").read_text())["artifacts"]
        for name, entry in written.items():
            assert entry["artifacts"][0]["uri"] == str(run_dir / task / name)
        if "mlpipeline_ui_metadata" in written:  # a training task: the KFP UI's TensorBoard viewer of its Model
            viewers = json.loads((run_dir / task / "mlpipeline_ui_metadata").read_text())["outputs"]
            assert viewers == [{"type": "tensorboard", "source": str(run_dir / task / "model" / "tensorboard")}]
            assert list((run_dir / task / "model" / "tensorboard").glob("events.out.tfevents.*"))

    dataset = json.loads((run_dir / "curate" / "dataset" / "manifest.json").read_text())
    assert dataset["kind"] == "Dataset" and dataset["splits"]["train"] > 0 and dataset["splits"]["eval"] > 0

    artifacts = {}  # benchmarked name -> Model directory; a distill output holds one Model per student
    for name in models:
        manifest = json.loads((run_dir / name / "model" / "manifest.json").read_text())
        assert manifest["kind"] == "Model" and manifest["stage"] == name
        students = manifest.get("students") or {}
        artifacts |= {f"{name}.{s}": run_dir / name / "model" / rel for s, rel in students.items()} if students else \
            {name: run_dir / name / "model"}
    assert {n.split(".")[0] for n in artifacts} == set(models) and len(artifacts) > len(models)  # 2 tiny students
    for name, model_dir in artifacts.items():
        manifest = json.loads((model_dir / "manifest.json").read_text())
        timm_spec = manifest["timm"]
        net = timm.create_model(timm_spec["name"], pretrained=True, **timm_spec["kwargs"],
                                pretrained_cfg_overlay={"file": str(model_dir / "backbone.safetensors")}).eval()
        size = timm_spec["kwargs"].get("img_size", 64)
        with torch.no_grad():
            features = net(torch.rand(2, 3, size, size))
        assert features.shape == (2, timm_spec["kwargs"]["embed_dim"]) and torch.isfinite(features).all()

    bench = run_dir / "benchmark"
    metrics = json.loads((bench / "metrics" / "metrics.json").read_text())
    assert set(metrics["models"]) == {*artifacts, "random"}
    for name, values in metrics["models"].items():
        assert values and all(isinstance(v, (int, float)) for v in values.values()), name
    logged = json.loads((bench / "executor_output.json").read_text())["artifacts"]["metrics"]["artifacts"][0]
    assert {key.split("/")[0] for key in logged["metadata"]} == {*artifacts, "random"}
    html = (bench / "report").read_text()
    assert html.lstrip().lower().startswith("<!doctype html") or "<html" in html[:500].lower()
    assert all(name in html for name in artifacts) and "data:image/png;base64," in html
    markdown = (bench / "report_md").read_text()
    assert markdown.startswith("# ") and all(name in markdown for name in artifacts)
    assert (bench / "report_dir" / "report.html").is_file()


@pytest.mark.slow
def test_tiny_dag_in_process_mode_from_the_compiled_yaml(tmp_path: Path) -> None:
    pipeline = compile_tiny(tmp_path)
    run_dir = run_dag(pipeline, tmp_path / "root", "process")
    check_dag_outputs(run_dir)
