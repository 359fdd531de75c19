"""What the distill stage reads: Models with heads (the teacher, exported students) and the Models
students start from."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from gramline.errors import InputError
from gramline.models.config import BackboneConfig, HeadsConfig
from gramline.models.io import BACKBONE_FILE, HEADS_FILE
from gramline.train.recipes.dino.config import DinoConfig, run_tree
from gramline.train.recipes.dino.inputs import (
    dino_state_from_model,
    model_manifest,
    require_teacher_with_heads,
)
from gramline.train.recipes.dino.model import DinoModel


def load_dino_model(model_dir: Path, flag: str) -> tuple[DinoModel, DinoConfig]:
    """A Model artifact with heads (the teacher, an exported student) as a DinoModel (backbone, mask
    token, DINO and iBOT heads) in eval mode, and its training config."""
    manifest = require_teacher_with_heads(model_dir, flag)
    config = DinoConfig.model_validate(run_tree(manifest.get("config") or {}, f"{flag} {model_dir}"))
    model = DinoModel(config.backbone, config.heads)
    model.load_state_dict(dino_state_from_model(model_dir, config, flag))
    return model.eval(), config


def student_init(model_dir: Path, backbone: BackboneConfig, heads: HeadsConfig, flag: str) -> dict[str, Tensor]:
    """Weights a student of this architecture starts from: the artifact's backbone, and its heads
    when it has heads of the student's sizes."""
    model_dir = Path(model_dir)
    manifest = model_manifest(model_dir, flag)
    if manifest.get("arch") not in (None, backbone.arch):
        raise InputError(f"{flag} {model_dir}", f"holds a {manifest.get('arch')} backbone, the student is "
                         f"{backbone.arch}", "a Model artifact of the student's architecture")
    if not (model_dir / BACKBONE_FILE).is_file():
        raise InputError(f"{flag} {model_dir}", f"has no {BACKBONE_FILE}", "a Model artifact with backbone weights")
    state = {f"backbone.vit.{k}": v for k, v in load_file(str(model_dir / BACKBONE_FILE)).items()}
    with torch.device("meta"):
        reference = DinoModel(backbone, heads).state_dict()
    if (model_dir / HEADS_FILE).is_file():
        heads_state = {"backbone.mask_token" if k == "mask_token" else k: v
                       for k, v in load_file(str(model_dir / HEADS_FILE)).items()}
        if all(k in reference and reference[k].shape == v.shape for k, v in heads_state.items()):
            state |= heads_state
    wrong = sorted(k for k, v in state.items() if k not in reference or reference[k].shape != v.shape)
    if wrong:
        raise InputError(f"{flag} {model_dir}", f"does not fit the student ({wrong[:3]}{' ...' if len(wrong) > 3 else ''})",
                         "weights of the student's architecture")
    return state
