"""What the distill stage reads: Models with heads (the teacher, exported students) and the weights
students start from."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from gramline.errors import InputError
from gramline.models.archs import ARCHS
from gramline.models.config import BackboneConfig, HeadsConfig
from gramline.models.init_from import load_starting_weights
from gramline.train.recipes.dino.config import DinoConfig, run_tree
from gramline.train.recipes.dino.inputs import (
    dino_state_from_model,
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


def student_init(spec: str, backbone: BackboneConfig, heads: HeadsConfig, flag: str) -> dict[str, Tensor]:
    """DinoModel weights a student of this architecture starts from: the backbone `spec` names
    (gramline.models.init_from: timm:<name>[@<file>], a Model directory, an official checkpoint),
    and its mask token and heads when it has them in the student's sizes."""
    start = load_starting_weights(spec, prefer=backbone.arch, flag=flag)
    if start.arch != backbone.arch:
        raise InputError(f"{flag} {spec}", f"holds {start.arch} weights (embed_dim {ARCHS[start.arch].embed_dim}, "
                         f"depth {ARCHS[start.arch].depth}), the student is {backbone.arch} (embed_dim "
                         f"{ARCHS[backbone.arch].embed_dim}, depth {ARCHS[backbone.arch].depth})",
                         f"weights of the student's architecture {backbone.arch}, or that student's arch set to "
                         f"{start.arch}")
    with torch.device("meta"):
        reference = DinoModel(backbone, heads).state_dict()
    state = {f"backbone.vit.{k}": v for k, v in start.backbone.items()}
    wrong = sorted(k for k, v in state.items() if k not in reference or reference[k].shape != v.shape)
    if wrong:
        raise InputError(f"{flag} {spec}", f"does not fit the student ({wrong[:3]}{' ...' if len(wrong) > 3 else ''})",
                         "weights of the student's architecture")
    mask = reference["backbone.mask_token"]
    if start.mask_token is not None and start.mask_token.numel() == mask.numel():
        state["backbone.mask_token"] = start.mask_token.reshape(mask.shape)
    if start.heads and all(k in reference and reference[k].shape == v.shape for k, v in start.heads.items()):
        state |= start.heads
    return state
