"""Model artifacts from a trained DINO model: the backbone in timm layout, its heads, the manifest.

Used for the final export of every training stage and for the periodic teacher checkpoints the
anchor stage chooses from (`checkpoints/teacher-XXXXXXXX/`, each a complete Model artifact).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from gramline.artifacts import build_manifest, write_manifest
from gramline.config import dump_config
from gramline.models.backbone import Backbone, timm_spec
from gramline.models.config import BackboneConfig
from gramline.models.io import BACKBONE_FILE, HEADS_FILE, save_weights, timm_manifest_entry
from gramline.train.config import ExportConfig

TEACHER_DIR = re.compile(r"^teacher-(\d{8})$")
STATE_DIR, CHECKPOINTS_DIR = "state", "checkpoints"  # a run's resumable checkpoints, its periodic teacher Models


def write_model_artifact(directory: Path, backbone: Backbone, heads: Mapping[str, Any], backbone_config: BackboneConfig,
                         config: BaseModel, stage: str, step: int, metrics: Mapping[str, Any],
                         **manifest: Any) -> dict[str, Any]:
    """`backbone.safetensors` (timm keys), `heads.safetensors` (each head's weights under its name,
    and the mask token), then `manifest.json`; `manifest` entries (inputs, phase records) go into it."""
    name, kwargs = timm_spec(backbone_config)
    save_weights(directory / BACKBONE_FILE, backbone.vit.state_dict(), {"format": "pt", "timm_model": name})
    weights = {f"{head}.{key}": value for head, module in heads.items() for key, value in module.state_dict().items()}
    weights["mask_token"] = backbone.mask_token
    save_weights(directory / HEADS_FILE, weights, {"format": "pt"})
    record = build_manifest(
        "Model", stage, config=dump_config(config), inputs=list(manifest.pop("inputs", [])), counts={"step": step},
        metrics=dict(metrics), timm=timm_manifest_entry(name, kwargs), arch=backbone_config.arch, step=step,
        embed_dim=backbone.embed_dim, patch_size=backbone.patch_size, img_size=backbone_config.img_size, **manifest,
    )
    write_manifest(directory, record)
    return record


def list_teacher_checkpoints(model_dir: Path) -> list[tuple[int, Path]]:
    root = Path(model_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := TEACHER_DIR.match(p.name))
             and (p / "manifest.json").is_file()]
    return sorted(found)


def thinned(steps: Sequence[int], keep: int) -> list[int]:
    """The steps still kept when at most `keep` may stay: while there are too many, every other one
    is dropped, counting from the oldest (which stays), so the kept ones remain spread over the run
    rather than bunched at its end (the anchor stage looks for an early checkpoint)."""
    kept = sorted(steps)
    while len(kept) > keep:
        kept = kept[::2] if keep > 1 else kept[:1]
    return kept


# What the pipeline's next stages read from a stage's Model besides its weights and manifest (the
# edges of gramline.kfp.pipeline): gram continues pretrain's run from its state/, anchor picks one of
# pretrain's teacher checkpoints. highres, distill, align and benchmark read the weights only.
READ_DOWNSTREAM: dict[str, tuple[str, ...]] = {"pretrain": (STATE_DIR, CHECKPOINTS_DIR)}


def lean_export(model_dir: Path, stage: str, export: ExportConfig, artifact: bool) -> list[str]:
    """Delete from a finished run's Model what `export` does not keep (`auto`: see ExportConfig, with
    `artifact` true in a pipeline task); the names deleted. Called only after the final manifest is
    written, so that an interrupted run still resumes from its state/."""
    dropped = []
    for name, choice in ((STATE_DIR, export.state), (CHECKPOINTS_DIR, export.teacher_checkpoints)):
        keep = choice == "keep" or (choice == "auto" and (not artifact or name in READ_DOWNSTREAM.get(stage, ())))
        if not keep and (Path(model_dir) / name).exists():
            shutil.rmtree(Path(model_dir) / name)
            dropped.append(name)
    return dropped


def thin_teacher_checkpoints(model_dir: Path, keep: int) -> None:
    """Delete the teacher checkpoints that `thinned` does not keep."""
    found = list_teacher_checkpoints(model_dir)
    keep_steps = set(thinned([step for step, _ in found], keep))
    for step, path in found:
        if step not in keep_steps:
            shutil.rmtree(path, ignore_errors=True)
