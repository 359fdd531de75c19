"""Write Model artifacts from a trainer: the teacher's backbone in timm layout, its heads, manifest.

Used for the final export of every training stage and for the periodic teacher checkpoints the
anchor stage chooses from (`checkpoints/teacher-XXXXXXXX/`, each a complete Model artifact).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Mapping

from gramline.artifacts import build_manifest, write_manifest
from gramline.config import SSLConfig, dump_config
from gramline.io import atomic_path
from gramline.models.backbone import timm_spec
from gramline.models.io import BACKBONE_FILE, HEADS_FILE, save_weights, timm_manifest_entry
from gramline.train.model import SSLModel

TEACHER_DIR = re.compile(r"^teacher-(\d{8})$")


def _write_model_files(directory: Path, teacher: SSLModel, config: SSLConfig, stage: str, step: int,
                       inputs: list[dict[str, Any]], metrics: Mapping[str, Any], extra: Mapping[str, Any]) -> dict:
    name, kwargs = timm_spec(config.backbone)
    save_weights(directory / BACKBONE_FILE, teacher.backbone.vit.state_dict(), {"format": "pt", "timm_model": name})
    heads = {f"{head}.{key}": value for head, module in teacher.heads().items()
             for key, value in module.state_dict().items()}
    heads["mask_token"] = teacher.backbone.mask_token
    save_weights(directory / HEADS_FILE, heads, {"format": "pt"})
    manifest = build_manifest(
        "Model", stage, config=dump_config(config), inputs=inputs, counts={"step": step}, metrics=dict(metrics),
        timm=timm_manifest_entry(name, kwargs), arch=config.backbone.arch, step=step,
        embed_dim=teacher.backbone.embed_dim, patch_size=teacher.backbone.patch_size,
        img_size=config.backbone.img_size, **extra,
    )
    write_manifest(directory, manifest)
    return manifest


def export_model(out_dir: Path, teacher: SSLModel, config: SSLConfig, stage: str, step: int,
                 inputs: list[dict[str, Any]], metrics: Mapping[str, Any], **extra: Any) -> dict:
    """Final export into the stage's output directory (manifest written last)."""
    return _write_model_files(out_dir, teacher, config, stage, step, inputs, metrics, extra)


def export_teacher_checkpoint(out_dir: Path, teacher: SSLModel, config: SSLConfig, stage: str, step: int,
                              inputs: list[dict[str, Any]], metrics: Mapping[str, Any]) -> Path:
    final = out_dir / "checkpoints" / f"teacher-{step:08d}"
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        _write_model_files(tmp, teacher, config, stage, step, inputs, metrics, {"checkpoint_of": str(out_dir)})
    return final


def list_teacher_checkpoints(model_dir: Path) -> list[tuple[int, Path]]:
    root = Path(model_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := TEACHER_DIR.match(p.name))
             and (p / "manifest.json").is_file()]
    return sorted(found)


def remove_partial_output(out_dir: Path) -> None:
    """Drop an output directory this process created before anything complete was written."""
    if out_dir.exists() and not any(out_dir.iterdir()):
        shutil.rmtree(out_dir, ignore_errors=True)
