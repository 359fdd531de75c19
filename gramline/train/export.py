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

TEACHER_DIR = re.compile(r"^teacher-(\d{8})$")


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


def thin_teacher_checkpoints(model_dir: Path, keep: int) -> None:
    """Delete the teacher checkpoints that `thinned` does not keep."""
    found = list_teacher_checkpoints(model_dir)
    keep_steps = set(thinned([step for step, _ in found], keep))
    for step, path in found:
        if step not in keep_steps:
            shutil.rmtree(path, ignore_errors=True)
