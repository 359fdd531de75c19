"""What a benchmark run writes: the Metrics artifact (metrics.json), the Report artifact (HTML,
Markdown, PNG figures) and the optional single-file copies, each directory written atomically."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gramline.artifacts import build_manifest, lineage_entry, write_manifest
from gramline.eval import report as rep
from gramline.eval.features import EvalData, ModelSpec
from gramline.io import emptied_dir, write_bytes_atomic, write_json_atomic

if TYPE_CHECKING:
    from gramline.eval.benchmark import BenchmarkConfig, BenchmarkRequest, BenchmarkResult

STAGE = "benchmark"  # the stage the manifests name


def flat_metrics(result: BenchmarkResult) -> dict[str, float]:
    """KFP Metrics metadata: one scalar per `<model>/<metric>` key."""
    return {f"{r.model.name}/{k}": float(v) for r in result.runs for k, v in r.metrics.items()}


def _lineage(specs: Sequence[ModelSpec], dataset: Path) -> list[dict[str, Any]]:
    inputs = [lineage_entry("eval_dataset", dataset)]
    for spec in specs:
        if spec.kind == "dir":
            inputs.append(lineage_entry(spec.name, spec.target))
        else:
            inputs.append({"name": spec.name, "kind": spec.kind, "spec": spec.describe()})
    return inputs


def write_outputs(request: BenchmarkRequest, config: BenchmarkConfig, data: EvalData,
                  result: BenchmarkResult) -> dict[str, float]:
    """Write every output of the request; the flat metrics (see `flat_metrics`)."""
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    dataset_info = {"eval images": data.n, "size": f"{data.size[0]}x{data.size[1]}",
                    "classes": len(data.classes), "labelled": int((data.labels >= 0).sum()),
                    "masks": "yes" if data.masks is not None else "no"}
    if result.plan.labelled is not None:
        dataset_info["chance top-1"] = f"{100 / data.num_classes():.1f}%"
    report = rep.Report(config.report.title, str(request.eval_dataset), dataset_info,
                        [r.section for r in result.runs if r.section is not None], result.notes,
                        result.reference, created)
    flat = flat_metrics(result)
    payload = {
        "models": {r.model.name: r.metrics for r in result.runs},
        "details": {r.model.name: {"input_size": r.size, "spec": r.model.spec.describe(), **r.details}
                    for r in result.runs},
        "reference": result.reference,
        "notes": result.notes,
        "dataset": {"path": str(request.eval_dataset), **dataset_info},
        "config": config.model_dump(mode="json"),
        "created_at": created,
    }
    inputs = _lineage(request.specs, request.eval_dataset)
    # Each output directory is written in place, its manifest last (complete once that is there): its
    # parent need not be writable (a container sees only the output directories themselves).
    metrics_dir = emptied_dir(request.out_metrics)
    write_json_atomic(metrics_dir / "metrics.json", payload)
    write_manifest(metrics_dir, build_manifest("Metrics", STAGE, config.model_dump(mode="json"), inputs,
                                               counts={"models": len(result.runs), "eval_images": data.n}, metrics=flat))
    html = rep.render_html(report)
    markdown = rep.render_markdown(report)
    report_dir = emptied_dir(request.out_report)
    (report_dir / "images").mkdir()
    write_bytes_atomic(report_dir / "report.html", html.encode())
    write_bytes_atomic(report_dir / "report.md", markdown.encode())
    for name, png in rep.figure_files(report).items():
        write_bytes_atomic(report_dir / "images" / name, png)
    write_manifest(report_dir, build_manifest("Report", STAGE, config.model_dump(mode="json"), inputs,
                                              counts={"models": len(result.runs)}, metrics=flat))
    if request.out_html:
        write_bytes_atomic(request.out_html, html.encode())
    if request.out_markdown:
        write_bytes_atomic(request.out_markdown, rep.render_markdown(report, image_dir=None).encode())
    return flat
