"""The benchmark: global and dense probes of every model on one eval split, side by side.

Each model (a Model artifact, an official checkpoint, a timm backbone or a seeded random init; see
gramline.eval.features) gets, on the eval split: k-NN and a linear probe on its labels
(gramline.eval.knn, .linear), a linear segmentation probe on its masks (.segprobe), patch
correspondence (.dense), and when it carries a text tower zero-shot classification, image-text
retrieval on the captions and zero-shot segmentation on the masks (.zeroshot); after all models,
the Gram similarity of each to a reference model (`dense.reference`; the benchmark stage's
`--start-model` makes it the weights training started from). These are small-scale versions of the
DINOv3 paper's evaluations (arXiv 2508.10104). Every model sees the same fixed-seed splits
(`plan_probes`); whatever cannot run is skipped with a note the report prints. `run_benchmark` is
the whole job, outputs included (gramline.eval.benchmark_outputs).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator

from gramline.artifacts import read_manifest
from gramline.config import Strict, load_stage_config
from gramline.errors import InputError
from gramline.eval import report as rep
from gramline.eval.benchmark_outputs import STAGE, write_outputs
from gramline.eval.dense import dense_quality, gram_similarity
from gramline.eval.features import (
    EvalData,
    LoadedModel,
    ModelSpec,
    extract_features,
    input_size_for,
    load_eval_data,
    load_model,
    preprocess,
    split_indices,
    torch_threads,
)
from gramline.eval.knn import knn_accuracy
from gramline.eval.linear import DEFAULT_LRS, linear_probe, probe_input
from gramline.eval.segprobe import seg_probe
from gramline.eval.zeroshot import (
    DEFAULT_BACKGROUND,
    DEFAULT_RECALL_KS,
    DEFAULT_TEMPLATES,
    TextAligned,
    ZeroShotUnavailable,
    retrieval_recall,
    seg_class_embeddings,
    text_query_maps,
    text_tower_of,
    zero_shot_accuracy,
    zero_shot_segmentation,
)
from gramline.progress import Progress

MIN_LABELLED = 4


# --------------------------------------------------------------------------- config


class KnnSettings(Strict):
    ks: list[int] = Field(default_factory=lambda: [10, 20])
    temperature: float = 0.07


class LinearSettings(Strict):
    lrs: list[float] = Field(default_factory=lambda: list(DEFAULT_LRS))
    epochs: int = 100
    batch_size: int = 128
    val_fraction: float = 0.2


class SegSettings(Strict):
    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-3
    batch_size: int = 32


class DenseSettings(Strict):
    images: int = 32  # images used for correspondence and Gram similarity
    crop_fraction: float = 0.6
    reference: str | None = None  # model name the Gram metrics compare against (default: the first)


class ReportSettings(Strict):
    title: str = "gramline benchmark"
    images: int = 6
    tile: int = 96


class ZeroShotSettings(Strict):
    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    recall_ks: list[int] = Field(default_factory=lambda: list(DEFAULT_RECALL_KS))  # retrieval recall@k
    background: str = DEFAULT_BACKGROUND  # the class name the templates prompt the background (mask 0) with


class BenchmarkConfig(Strict):
    preset: str = "custom"
    seed: int = 0
    batch_size: int = 64
    max_images: int | None = None  # cap on eval images (the first N in dataset order)
    img_size: int | None = None  # input side for every model (default: each model's own)
    random_img_size: int = 64  # input side of `random:<arch>` baselines (default: the preset's)
    test_fraction: float = 0.5  # held-out share of the eval split for every probe
    threads: int = 0  # torch intra-op threads (0: torch's default); the tiny preset uses 1 (see torch_threads)
    knn: KnnSettings = KnnSettings()
    linear: LinearSettings = LinearSettings()
    seg: SegSettings = SegSettings()
    dense: DenseSettings = DenseSettings()
    report: ReportSettings = ReportSettings()
    zeroshot: ZeroShotSettings = ZeroShotSettings()

    @model_validator(mode="after")
    def _sane(self) -> BenchmarkConfig:
        checks = [
            (0 < self.test_fraction < 1, "test_fraction must be in (0, 1)"),
            (0 < self.linear.val_fraction < 1, "linear.val_fraction must be in (0, 1)"),
            (0 < self.dense.crop_fraction <= 1, "dense.crop_fraction must be in (0, 1]"),
            (bool(self.knn.ks) and min(self.knn.ks) > 0, "knn.ks must be positive integers"),
            (bool(self.zeroshot.recall_ks) and min(self.zeroshot.recall_ks) > 0,
             "zeroshot.recall_ks must be positive integers"),
            (bool(self.zeroshot.templates) and all("{}" in t for t in self.zeroshot.templates),
             "zeroshot.templates must be non-empty, each with a {} for the class name"),
            (self.knn.temperature > 0, "knn.temperature must be > 0"),
            (bool(self.linear.lrs) and min(self.linear.lrs) > 0, "linear.lrs must be positive"),
            (self.batch_size > 0 and self.linear.epochs > 0 and self.seg.steps > 0,
             "batch_size, linear.epochs and seg.steps must be > 0"),
            (self.report.images > 0 and self.dense.images > 0, "report.images and dense.images must be > 0"),
            (self.max_images is None or self.max_images > 0, "max_images must be > 0"),
            (self.threads >= 0, "threads must be >= 0 (0 = torch's default)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self


def load_benchmark_config(preset: str, config_file: Path | None, overrides: Sequence[str]) -> BenchmarkConfig:
    return load_stage_config(BenchmarkConfig, "benchmark", preset, config_file, overrides)


@dataclass(frozen=True)
class BenchmarkRequest:
    """The models to compare, the eval Dataset, and where the outputs go."""

    specs: Sequence[ModelSpec]
    eval_dataset: Path
    out_metrics: Path  # metrics.json + manifest
    out_report: Path  # report.html, report.md, images/ + manifest
    out_html: Path | None = None  # a copy of the HTML page
    out_markdown: Path | None = None  # the Markdown with the figures inlined


# --------------------------------------------------------------------------- the plan


@dataclass
class ProbePlan:
    """Fixed-seed splits shared by every model, and the reasons for whatever cannot run."""

    labelled: np.ndarray | None = None  # positions in the eval data with labels
    knn_train: np.ndarray | None = None  # positions into `labelled`
    test: np.ndarray | None = None
    fit: np.ndarray | None = None  # subsets of knn_train for the linear probe
    val: np.ndarray | None = None
    seg_train: np.ndarray | None = None
    seg_test: np.ndarray | None = None
    seg_classes: int = 0
    report_images: list[int] = field(default_factory=list)
    dense_images: int = 0
    notes: list[str] = field(default_factory=list)


def plan_probes(data: EvalData, config: BenchmarkConfig) -> ProbePlan:
    plan = ProbePlan()
    labelled = data.labelled()
    n_classes = len(np.unique(data.labels[labelled]))
    if len(labelled) >= MIN_LABELLED and n_classes >= 2:
        labels = data.labels[labelled]
        plan.labelled = labelled
        plan.knn_train, plan.test = split_indices(labels, config.test_fraction, config.seed)
        if len(labelled) < data.n:
            plan.notes.append(f"k-NN and linear probe use the {len(labelled)} labelled of {data.n} eval images.")
        if len(plan.knn_train) >= 2:
            fit, val = split_indices(labels[plan.knn_train], config.linear.val_fraction, config.seed)
            plan.fit, plan.val = plan.knn_train[fit], plan.knn_train[val]
        else:
            plan.notes.append("linear probe skipped: too few labelled images for a validation split.")
    elif len(labelled) == 0:
        plan.notes.append("The eval dataset has no labels: k-NN, linear probe and zero-shot were skipped; "
                          "only the label-free diagnostics ran (patch correspondence, Gram similarity"
                          + (", segmentation probe on masks" if data.masks is not None else "") + ").")
    else:
        plan.notes.append(f"k-NN and linear probe skipped: {len(labelled)} labelled images in {n_classes} "
                          f"class(es); they need at least {MIN_LABELLED} images and 2 classes.")
    if data.masks is None:
        plan.notes.append("segmentation probe skipped: the eval split has no masks (seg.png).")
    elif data.n < 2:
        plan.notes.append("segmentation probe skipped: it needs at least 2 eval images.")
    else:
        plan.seg_train, plan.seg_test = split_indices(np.zeros(data.n, dtype=np.int64), config.test_fraction,
                                                      config.seed)
        plan.seg_classes = max(len(data.classes) + 1, int(data.masks.max()) + 1)
    plan.report_images = report_indices(data.labels, config.report.images)
    plan.dense_images = min(config.dense.images, data.n)
    return plan


def report_indices(labels: np.ndarray, n: int) -> list[int]:
    """A fixed set: the first image of each class (in class order), then the first others."""
    chosen: list[int] = []
    for cls in sorted(set(labels[labels >= 0].tolist())):
        if len(chosen) < n:
            chosen.append(int(np.flatnonzero(labels == cls)[0]))
    for i in range(len(labels)):
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen)


def query_point(data: EvalData, index: int) -> tuple[float, float]:
    """Where the query patch sits (fractions of height, width): the object's centre when a mask says."""
    if data.masks is not None:
        ys, xs = np.nonzero(data.masks[index])
        if len(ys):
            h, w = data.masks.shape[1:]
            return (float(ys.mean()) + 0.5) / h, (float(xs.mean()) + 0.5) / w
    return 0.5, 0.5


# --------------------------------------------------------------------------- one model


@dataclass
class ModelRun:
    model: LoadedModel
    size: int
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    dense_patches: torch.Tensor | None = None
    section: rep.ModelSection | None = None


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x))


def evaluate_model(model: LoadedModel, data: EvalData, plan: ProbePlan, config: BenchmarkConfig) -> ModelRun:
    size = input_size_for(model, config.img_size)
    run = ModelRun(model, size)
    if data.size != (size, size):
        run.notes.append(f"eval images ({data.size[0]}x{data.size[1]}) were resized to {size}x{size} for this model.")
    need_all_patches = plan.seg_train is not None
    feats = extract_features(model, data.images, size, config.batch_size, keep_patches=need_all_patches)
    spread = float(feats.cls.std(dim=0).max()) if data.n > 1 else 1.0
    if spread < 1e-4 * float(feats.cls.abs().mean()):
        run.notes.append(f"its CLS token is the same for every image (largest std {spread:.1e}), so k-NN on it is "
                         "at chance: expected for a random-init DINOv3 ViT, whose LayerScale starts at 1e-5.")
    if plan.labelled is not None:
        labels = _t(data.labels[plan.labelled])
        cls = feats.cls[plan.labelled]
        train, test = plan.knn_train, plan.test
        num_classes = data.num_classes()
        accs = knn_accuracy(cls[train], labels[train], cls[test], labels[test], config.knn.ks,
                            config.knn.temperature, num_classes)
        for k, acc in accs.items():
            run.metrics[f"knn_top1_k{k}"] = acc
        if plan.fit is not None:
            x = probe_input(feats.cls, feats.mean_patch)[plan.labelled]
            result = linear_probe(x[plan.fit], labels[plan.fit], x[plan.val], labels[plan.val], x[test], labels[test],
                                  num_classes, config.linear.lrs, config.linear.epochs, config.linear.batch_size,
                                  config.seed)
            run.metrics["linear_top1"] = result.test_top1
            run.details.update(linear_best_lr=result.best_lr, linear_val_top1=result.val_top1,
                               linear_val_by_lr={str(k): v for k, v in result.val_by_lr.items()})
    if plan.seg_train is not None and feats.patches is not None and data.masks is not None:
        masks = _t(data.masks)
        seg = seg_probe(feats.patches[plan.seg_train], masks[plan.seg_train], feats.patches[plan.seg_test],
                        masks[plan.seg_test], plan.seg_classes, config.seg.steps, config.seg.lr,
                        config.seg.weight_decay, config.seg.batch_size, config.seed)
        run.metrics["seg_miou"] = seg.miou
        run.metrics["seg_pixel_acc"] = seg.pixel_acc
        run.details["seg_iou_by_class"] = {str(k): v for k, v in seg.iou_by_class.items()}
    dense = data.images[:plan.dense_images]
    run.metrics.update(dense_quality(model.module, dense, size, crop_fraction=config.dense.crop_fraction,
                                     seed=config.seed, batch_size=config.batch_size))
    subset = sorted(set(range(plan.dense_images)) | set(plan.report_images))
    sub = extract_features(model, data.images[subset], size, config.batch_size, label=f"{model.name} (figures)")
    assert sub.patches is not None
    run.dense_patches = sub.patches[:plan.dense_images]
    tower = _zero_shot(run, data, plan, config)
    report_patches = sub.patches[[subset.index(i) for i in plan.report_images]]
    run.section = _section(run, data, plan, report_patches, config, tower)
    return run


def _batches(images: torch.Tensor, size: int, batch_size: int) -> Iterator[torch.Tensor]:
    for lo in range(0, images.shape[0], batch_size):
        yield preprocess(images[lo:lo + batch_size], size)


def _zero_shot(run: ModelRun, data: EvalData, plan: ProbePlan, config: BenchmarkConfig) -> TextAligned | None:
    """Zero-shot classification, retrieval and segmentation; the tower, or None when there is none."""
    try:
        tower = text_tower_of(run.model)
    except ZeroShotUnavailable as why:
        run.details["zeroshot_skipped"] = str(why)
        return None
    settings = config.zeroshot
    with torch.inference_mode():
        if plan.labelled is None or plan.test is None or not data.classes:
            run.details["zeroshot_skipped"] = f"{run.model.name}: the eval split has no labelled class names"
        else:
            test = plan.labelled[plan.test]
            images = preprocess(data.images[test], run.size)
            labels = _t(data.labels[test])
            run.metrics["zeroshot_top1"] = zero_shot_accuracy(tower, images, labels, data.classes,
                                                              settings.templates)
        _retrieval(run, tower, data, config)
        if plan.seg_test is None or data.masks is None or not data.classes:
            run.notes.append("zero-shot segmentation skipped: it needs masks and class names in the eval "
                             "split.")
        else:
            class_emb = seg_class_embeddings(tower, data.classes, settings.templates, settings.background)
            masks = _t(data.masks[plan.seg_test]).long()
            batches = _batches(data.images[plan.seg_test], run.size, config.batch_size)
            patches = (tower.encode_patches(x) for x in batches)
            pairs = zip(patches, masks.split(config.batch_size))
            seg = zero_shot_segmentation(pairs, class_emb, plan.seg_classes)
            run.metrics["zeroshot_seg_miou"] = seg.miou
            run.metrics["zeroshot_seg_pixel_acc"] = seg.pixel_acc
            run.details["zeroshot_seg_iou_by_class"] = {str(k): v for k, v in seg.iou_by_class.items()}
    return tower


def _retrieval(run: ModelRun, tower: TextAligned, data: EvalData, config: BenchmarkConfig) -> None:
    """Recall@k both ways over every eval image that has a caption (see zeroshot.retrieval_recall)."""
    captioned = [i for i, c in enumerate(data.captions) if c]
    if len(captioned) < 2:
        run.notes.append(f"retrieval skipped: {len(captioned)} eval image(s) have a caption; it needs at "
                         "least 2.")
        return
    captions = [str(data.captions[i]) for i in captioned]
    unique = list(dict.fromkeys(captions))  # identical captions embed identically: encode each once
    text = torch.cat([tower.encode_text(unique[lo:lo + config.batch_size]).float()
                      for lo in range(0, len(unique), config.batch_size)])
    position = {c: j for j, c in enumerate(unique)}
    text = text[[position[c] for c in captions]]
    image = torch.cat([tower.encode_image(x).float()
                       for x in _batches(data.images[captioned], run.size, config.batch_size)])
    for key, value in retrieval_recall(image, text, captions, config.zeroshot.recall_ks).items():
        run.metrics[f"retrieval_{key}"] = value
    if len(captioned) < data.n:
        run.notes.append(f"retrieval uses the {len(captioned)} of {data.n} eval images that have a caption.")


@torch.inference_mode()
def _text_figure(run: ModelRun, tower: TextAligned, data: EvalData, plan: ProbePlan,
                 config: BenchmarkConfig) -> tuple[bytes | None, list[str]]:
    """The report images that have a class, each with the first prompt template of its own class name
    as the text query, and the patch-text similarity map that query lights up."""
    chosen = [i for i in plan.report_images if 0 <= data.labels[i] < len(data.classes)]
    if not chosen:
        return None, []
    queries = [config.zeroshot.templates[0].format(data.classes[data.labels[i]]) for i in chosen]
    patches = tower.encode_patches(preprocess(data.images[chosen], run.size))
    maps = text_query_maps(patches, tower.encode_text(queries)).cpu().numpy()
    return rep.text_query_figure(data.images[chosen], maps, queries, config.report.tile), queries


def _section(run: ModelRun, data: EvalData, plan: ProbePlan, patches: torch.Tensor,
             config: BenchmarkConfig, tower: TextAligned | None = None) -> rep.ModelSection:
    model = run.model
    images = data.images[plan.report_images]
    grid = patches.shape[1]
    qy, qx = query_point(data, plan.report_images[0])
    query = (0, min(grid - 1, int(qy * grid)), min(grid - 1, int(qx * grid)))
    pca = rep.feature_figure(images, [rep.pca_rgb(patches)], config.report.tile)
    sim = rep.feature_figure(images, [rep.colormap(rep.cosine_maps(patches, query))], config.report.tile,
                             query=(*query, grid))
    curves = None
    if model.metrics_jsonl is not None:
        curves = rep.curves_png(rep.read_metrics_jsonl(model.metrics_jsonl), f"{model.name}: metrics.jsonl")
    notes = list(run.notes)
    if model.spec.kind == "dir" and curves is None:
        notes.append("no training curves: the Model has no (plottable) metrics.jsonl.")
    info = {"input": f"{run.size}px", "patch": model.patch_size, "embed_dim": model.embed_dim,
            "params": f"{model.num_params / 1e6:.2f}M", "timm": type(model.module).__name__}
    if "linear_best_lr" in run.details:
        info["linear probe lr"] = run.details["linear_best_lr"]
    text_png, queries = _text_figure(run, tower, data, plan, config) if tower is not None else (None, [])
    if tower is not None and text_png is None:
        notes.append("no text-query figure: none of the report images has a class name.")
    return rep.ModelSection(model.name, model.spec.describe(), dict(run.metrics), info,
                            rep.lineage_rows(model.manifest), pca, sim, curves, notes, text_png, queries)


# --------------------------------------------------------------------------- all models


def check_models(specs: Sequence[ModelSpec], config: BenchmarkConfig) -> None:
    """Fail fast (exit 2) on an unusable model or reference before any work is done."""
    from gramline.models.io import BACKBONE_FILE

    if config.dense.reference is not None and config.dense.reference not in {s.name for s in specs}:
        raise InputError("config dense.reference", f"{config.dense.reference!r} is not a --model name",
                         "one of " + ", ".join(s.name for s in specs))
    for spec in specs:
        flag = f"--model {spec.name}"
        if spec.kind == "dir":
            directory = Path(spec.target)
            read_manifest(directory, "Model", flag)
            if not (directory / BACKBONE_FILE).is_file():
                raise InputError(f"{flag} {directory}", f"has no {BACKBONE_FILE}",
                                 "a Model artifact with backbone weights")
        elif spec.kind == "timm" and spec.weights is not None and not spec.weights.is_file():
            raise InputError(f"{flag} weights file {spec.weights}", "does not exist", "a local weights file")
        elif spec.kind == "weights":
            file = spec.target.partition("@")[2] if spec.target.startswith("timm:") else spec.target
            if file and not Path(file).is_file():
                raise InputError(f"{flag} weights file {file}", "does not exist", "a local weights file")


@dataclass
class BenchmarkResult:
    runs: list[ModelRun]
    plan: ProbePlan
    reference: str | None
    notes: list[str]


def evaluate_models(specs: Sequence[ModelSpec], data: EvalData, config: BenchmarkConfig) -> BenchmarkResult:
    """Every model, one after the other (each freed after its turn), then the Gram comparison."""
    plan = plan_probes(data, config)
    runs: list[ModelRun] = []
    progress = Progress(STAGE, "model", total=len(specs), unit="models", stream=sys.stdout)
    for i, spec in enumerate(specs):
        model = load_model(spec, config.random_img_size, config.seed)
        t0 = time.perf_counter()
        run = evaluate_model(model, data, plan, config)
        run.model.module = None  # type: ignore[assignment]  # free the weights; the section keeps the figures
        runs.append(run)
        progress.update(i + 1, fields=run.metrics, extra=f"{spec.name} in {time.perf_counter() - t0:.1f}s",
                        force=True)
    reference = None
    if len(runs) >= 2:
        reference = config.dense.reference or runs[0].model.name
        ref = next(r for r in runs if r.model.name == reference)
        for run in runs:
            if run is not ref and run.dense_patches is not None and ref.dense_patches is not None:
                run.metrics.update(gram_similarity(run.dense_patches, ref.dense_patches))
                assert run.section is not None
                run.section.metrics = dict(run.metrics)
    notes = list(data.notes) + list(plan.notes)
    skipped = [r.details["zeroshot_skipped"] for r in runs if "zeroshot_skipped" in r.details]
    if skipped and all("no text tower" in s for s in skipped) and len(skipped) == len(runs):
        notes.append("zero-shot skipped: no model carries a text tower (only Models from the align stage do).")
    else:
        notes += [f"zero-shot skipped for {s}" for s in skipped]
    if len(runs) < 2:
        notes.append("Gram similarity skipped: it compares two models and only one was given.")
    return BenchmarkResult(runs, plan, reference, notes)


def run_benchmark(request: BenchmarkRequest, config: BenchmarkConfig) -> dict[str, float]:
    """Check the models, evaluate them all, write the outputs; the flat `<model>/<metric>` scalars.
    Nothing is written when a model or the dataset is unusable or nothing could be measured."""
    check_models(request.specs, config)
    data = load_eval_data(request.eval_dataset, config.max_images)
    with torch_threads(config.threads):
        result = evaluate_models(request.specs, data, config)
    if not any(r.metrics for r in result.runs):
        raise InputError(f"--eval-dataset {request.eval_dataset}",
                         "nothing could be measured: " + " ".join(result.notes))
    return write_outputs(request, config, data, result)
