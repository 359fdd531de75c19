"""The anchor: which teacher checkpoint of a pretrain run becomes the frozen Gram teacher.

Gram anchoring (DINOv3 paper, arXiv 2508.10104) pulls the patch-feature geometry of a long run
back towards that of an earlier teacher whose dense features were still good. Candidates are the
complete teacher checkpoints under <run>/checkpoints/teacher-XXXXXXXX/. With `anchor.step=N` that
checkpoint is taken. Otherwise each candidate (steps within anchor.min_step..anchor.max_step) is
scored by `gramline.eval.dense.dense_quality` on the first `anchor.images` images of a Dataset's
eval split: patch correspondence, averaged over `anchor.crop_fractions`, decides (ties: the earlier
step); each candidate's Gram correlation with the latest checkpoint is recorded beside it (how far
the run's patch geometry moved since). The export is a frozen Gram-teacher Model: the chosen
backbone only, with a manifest naming the checkpoint and every candidate's scores.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from gramline.artifacts import build_manifest, lineage_entry, read_manifest, write_manifest
from gramline.config import Strict, load_stage_config
from gramline.errors import InputError
from gramline.io import atomic_path
from gramline.progress import Progress

if TYPE_CHECKING:
    from torch import Tensor, nn

STAGE = "anchor"


class AnchorSettings(Strict):
    step: int | None = None  # take the teacher checkpoint of this step; None: choose by dense quality
    min_step: int = 0  # candidates for the dense choice: checkpoints with min_step <= step <= max_step
    max_step: int | None = None
    images: int = 64  # eval images scored per candidate
    size: int | None = None  # input side (default: the run's crops.global_size)
    crop_fractions: list[float] = Field(default_factory=lambda: [0.5, 0.7])  # correspondence crop sizes, averaged
    batch_size: int = 32
    seed: int = 0
    threads: int = 0  # torch intra-op threads while scoring (0: torch's default)


class AnchorConfig(Strict):
    preset: str = "custom"
    anchor: AnchorSettings = AnchorSettings()

    @model_validator(mode="after")
    def _sane(self) -> AnchorConfig:
        a = self.anchor
        if a.images <= 0 or a.batch_size <= 0 or a.threads < 0:
            raise ValueError("anchor.images and anchor.batch_size must be > 0, anchor.threads >= 0")
        if not a.crop_fractions or not all(0 < f <= 1 for f in a.crop_fractions):
            raise ValueError(f"anchor.crop_fractions={a.crop_fractions} must be a non-empty list of values in (0, 1]")
        if a.max_step is not None and a.max_step < a.min_step:
            raise ValueError(f"anchor.max_step={a.max_step} is below anchor.min_step={a.min_step}")
        return self


def load_anchor_config(preset: str, config_file: Path | str | None, overrides: Sequence[str]) -> AnchorConfig:
    return load_stage_config(AnchorConfig, "anchor", preset, config_file, overrides)


@dataclass(frozen=True)
class AnchorRequest:
    model: Path  # the pretrain Model artifact (with checkpoints/)
    dataset: Path | None  # the Dataset whose eval split scores the candidates (not needed with anchor.step)
    out_model: Path


@dataclass(frozen=True)
class ExportedAnchor:
    step: int
    checkpoint: Path
    mode: str  # "step" or "dense"
    manifest: dict[str, Any]


def input_side(module: nn.Module, manifest: dict[str, Any], settings: AnchorSettings) -> int:
    """anchor.size, else the run's global crop size, else the checkpoint's img_size."""
    from gramline.eval.features import patch_size_of

    patch = patch_size_of(module)
    size = settings.size or int((manifest.get("config") or {}).get("crops", {}).get("global_size", 0)) \
        or int(manifest.get("img_size") or 0)
    if size <= 0 or size % patch:
        raise InputError("config field 'anchor.size'", f"is {size or 'unset'}",
                         f"a positive multiple of the patch size {patch}")
    return size


def score_checkpoints(candidates: Sequence[tuple[int, Path]], dataset: Path, settings: AnchorSettings,
                      ) -> list[dict[str, Any]]:
    """Dense scores of each checkpoint: correspondence (mean over crop fractions) and Gram
    correlation/MSE against the latest candidate; rows in step order."""
    from gramline.eval.dense import dense_patches, dense_quality
    from gramline.eval.features import load_eval_data, torch_threads
    from gramline.models.io import load_backbone

    data = load_eval_data(dataset, max_images=settings.images, flag="--dataset")
    rows: list[dict[str, Any]] = []
    reference: Tensor | None = None
    progress = Progress(STAGE, "scoring", total=len(candidates), unit="ckpt", stream=sys.stdout)
    with torch_threads(settings.threads):
        for done, (step, path) in enumerate(reversed(candidates), 1):  # the latest first: it is the reference
            module, manifest = load_backbone(path, flag=f"checkpoint {path.name}")
            size = input_side(module, manifest, settings)
            if reference is None:
                reference = dense_patches(module, data.images, size, settings.batch_size)
            scores = dense_quality(module, data.images, size, crop_fraction=settings.crop_fractions,
                                   seed=settings.seed, batch_size=settings.batch_size, reference_patches=reference)
            rows.append({"step": step, "checkpoint": path.name, "correspondence": scores["corr_top1"],
                         "correspondence_by_fraction": {str(f): scores[f"corr_top1_crop{f}"]
                                                        for f in settings.crop_fractions},
                         "gram_corr_to_latest": scores["gram_corr"], "gram_mse_to_latest": scores["gram_mse"],
                         "images": data.n, "size": size})
            progress.update(done, fields={"correspondence": scores["corr_top1"],
                                          "gram_corr_to_latest": scores["gram_corr"]}, extra=path.name, force=True)
    return sorted(rows, key=lambda r: r["step"])


def choose(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Highest correspondence; the earliest step among equals."""
    return max(rows, key=lambda r: (r["correspondence"], -r["step"]))


def select(model_dir: Path, dataset: Path | None, settings: AnchorSettings) -> tuple[int, Path, dict[str, Any]]:
    """(step, checkpoint dir, why) of the anchor."""
    from gramline.train.export import list_teacher_checkpoints

    found = list_teacher_checkpoints(model_dir)
    if not found:
        raise InputError(f"--model {model_dir}", "has no teacher checkpoints (checkpoints/teacher-XXXXXXXX with a "
                         "manifest)", "a pretrain run with train.teacher_checkpoint_every > 0 that reached it")
    steps = [s for s, _ in found]
    if settings.step is not None:
        by_step = dict(found)
        if settings.step not in by_step:
            raise InputError("config field 'anchor.step'", f"is {settings.step}, which has no teacher checkpoint "
                             f"in {model_dir}/checkpoints", "one of " + ", ".join(map(str, steps)))
        return settings.step, by_step[settings.step], {"mode": "step", "available_steps": steps}
    upper = settings.max_step if settings.max_step is not None else max(steps)
    candidates = [(s, p) for s, p in found if settings.min_step <= s <= upper]
    if not candidates:
        raise InputError("config fields 'anchor.min_step'/'anchor.max_step'",
                         f"leave no candidate among steps {steps}", "a range containing some checkpoint steps")
    if dataset is None:
        raise InputError("--dataset", "is missing", "a Dataset artifact whose eval split scores the checkpoints "
                         "(or --set anchor.step=N to take a checkpoint by step)")
    rows = score_checkpoints(candidates, dataset, settings)
    best = choose(rows)
    why = {"mode": "dense", "metric": "correspondence", "candidates": rows, "available_steps": steps}
    return best["step"], dict(candidates)[best["step"]], why


def export_anchor(out_dir: Path, checkpoint: Path, step: int, why: dict[str, Any], config: dict[str, Any],
                  inputs: list[dict[str, Any]]) -> dict[str, Any]:
    """The frozen Gram-teacher Model: the checkpoint's backbone and a manifest recording the choice."""
    from gramline.models.io import BACKBONE_FILE

    source = read_manifest(checkpoint, "Model", f"checkpoint {checkpoint}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / BACKBONE_FILE) as tmp:
        shutil.copyfile(checkpoint / BACKBONE_FILE, tmp)
    keep = {k: source[k] for k in ("timm", "arch", "embed_dim", "patch_size", "img_size") if k in source}
    scores = {}
    if why["mode"] == "dense":
        chosen = next(r for r in why["candidates"] if r["step"] == step)
        scores = {"correspondence": chosen["correspondence"], "gram_corr_to_latest": chosen["gram_corr_to_latest"]}
    manifest = build_manifest("Model", STAGE, config=config, inputs=inputs, counts={"step": step},
                              metrics=scores, step=step, **keep,
                              anchor={"checkpoint": checkpoint.name, "step": step, **why},
                              training_config=source.get("config", {}), frozen=True, backbone_only=True)
    write_manifest(out_dir, manifest)
    return manifest


def run_anchor(request: AnchorRequest, config: AnchorConfig) -> ExportedAnchor:
    """Choose the anchor (by step or by dense quality) and export it to `request.out_model`."""
    read_manifest(request.model, "Model", "--model")
    step, checkpoint, why = select(request.model, request.dataset, config.anchor)
    inputs = [lineage_entry("model", request.model)]
    if request.dataset is not None and why["mode"] == "dense":
        inputs.append(lineage_entry("dataset", request.dataset))
    manifest = export_anchor(request.out_model, checkpoint, step, why, config.model_dump(mode="json"), inputs)
    return ExportedAnchor(step, checkpoint, why["mode"], manifest)
