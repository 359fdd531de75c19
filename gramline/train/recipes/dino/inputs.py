"""What the DINO stages read: Model artifacts (a Gram teacher backbone, a whole teacher with heads),
the run a stage continues, and the weights a run starts from (pretrain --init-from). Every check
names the flag and file at fault (InputError, exit 2).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from gramline.artifacts import read_manifest
from gramline.errors import InputError
from gramline.models.archs import ARCHS
from gramline.models.backbone import Backbone
from gramline.models.init_from import StartingWeights
from gramline.models.io import BACKBONE_FILE, HEADS_FILE, state_misfit
from gramline.train.checkpoint import STEP_DIR, latest_checkpoint, read_model_state
from gramline.train.recipes.dino.config import DinoConfig
from gramline.train.recipes.dino.model import DinoModel
from gramline.train.recipes.dino.recipe import upgrade_first_layout

# --------------------------------------------------------------------------- reading runs


def model_manifest(model_dir: Path, flag: str) -> dict[str, Any]:
    return read_manifest(model_dir, "Model", flag)


def latest_run_state(model_dir: Path, flag: str = "--model") -> tuple[int, Path]:
    """(step, directory) of a run's latest complete training checkpoint under `state/`."""
    path = latest_checkpoint(Path(model_dir) / "state")
    if path is None:
        raise InputError(f"{flag} {model_dir}", "has no training checkpoint (no complete state/step-* directory)",
                         "the output of a pretrain (or gram) run, whose state/ holds its resumable checkpoints")
    match = STEP_DIR.match(path.name)
    assert match is not None
    return int(match.group(1)), path


def _check_arch(manifest: Mapping[str, Any], config: DinoConfig, flag: str, model_dir: Path) -> None:
    """The artifact's backbone architecture must be the one the student is built with."""
    arch = manifest.get("arch")
    spec = (manifest.get("timm") or {}).get("kwargs", {})
    want = config.backbone.arch
    expected = ARCHS[want]
    same = arch == want if arch is not None else (
        spec.get("embed_dim") == expected.embed_dim and spec.get("depth") == expected.depth
        and spec.get("patch_size") == expected.patch_size)
    if not same:
        raise InputError(f"{flag} {model_dir}", f"holds a {arch or 'different'} backbone (embed_dim "
                         f"{spec.get('embed_dim')}, depth {spec.get('depth')}, patch {spec.get('patch_size')}) but the "
                         f"student is {want} (embed_dim {expected.embed_dim}, depth {expected.depth}, patch "
                         f"{expected.patch_size})", "a backbone of the student's architecture (backbone.arch)")


def _check_shapes(state: Mapping[str, Tensor], reference: Mapping[str, Tensor], where: str) -> None:
    detail = state_misfit(state, reference)
    if detail:
        raise InputError(where, f"does not fit the configured model ({detail})",
                         "weights of the same architecture and heads as the config")


def load_gram_backbone(model_dir: Path, config: DinoConfig, flag: str = "--anchor") -> Backbone:
    """A Model artifact's backbone as a training `Backbone` of the student's architecture."""
    model_dir = Path(model_dir)
    manifest = model_manifest(model_dir, flag)
    _check_arch(manifest, config, flag, model_dir)
    weights = model_dir / BACKBONE_FILE
    if not weights.is_file():
        raise InputError(f"{flag} {model_dir}", f"has no {BACKBONE_FILE}", "a Model artifact with backbone weights")
    backbone = Backbone(config.backbone)
    state = load_file(str(weights))
    _check_shapes(state, backbone.vit.state_dict(), str(weights))
    backbone.vit.load_state_dict(state, strict=True)
    return backbone.eval()


def require_teacher_with_heads(model_dir: Path, flag: str = "--model") -> dict[str, Any]:
    """The manifest of a Model that carries a whole DINO teacher (backbone and heads)."""
    model_dir = Path(model_dir)
    manifest = model_manifest(model_dir, flag)
    if not (model_dir / BACKBONE_FILE).is_file() or not (model_dir / HEADS_FILE).is_file():
        raise InputError(f"{flag} {model_dir}", f"lacks {BACKBONE_FILE} or {HEADS_FILE}",
                         "a Model from a DINO training stage (gram or pretrain), which carries its heads; an anchor "
                         "artifact has the backbone only")
    return manifest


def dino_state_from_model(model_dir: Path, config: DinoConfig, flag: str = "--model") -> dict[str, Tensor]:
    """DinoModel weights (backbone + mask token + DINO/iBOT heads) from a Model artifact's teacher."""
    model_dir = Path(model_dir)
    manifest = require_teacher_with_heads(model_dir, flag)
    _check_arch(manifest, config, flag, model_dir)
    heads_file = model_dir / HEADS_FILE
    state = {f"backbone.vit.{k}": v for k, v in load_file(str(model_dir / BACKBONE_FILE)).items()}
    for key, value in load_file(str(heads_file)).items():
        state["backbone.mask_token" if key == "mask_token" else key] = value
    with torch.device("meta"):
        reference = DinoModel(config.backbone, config.heads).state_dict()
    _check_shapes(state, reference, f"{flag} {model_dir}")
    return state


def check_run_state(run_dir: Path, config: DinoConfig, flag: str = "--model") -> Path:
    """The latest training checkpoint of the run a stage continues, after checking that its student
    fits the configured model (a clear error instead of a state-dict traceback)."""
    _, path = latest_run_state(run_dir, flag)
    with torch.device("meta"):
        reference = DinoModel(config.backbone, config.heads).state_dict()
    saved = read_model_state(path, upgrade_first_layout, mmap=True)
    _check_shapes(saved["student"], reference, f"{flag} {run_dir} ({path.name})")
    return path


# --------------------------------------------------------------------------- starting weights


def starting_state(start: StartingWeights, config: DinoConfig, flag: str = "--init-from") -> dict[str, Tensor]:
    """DinoModel weights from `start`: the backbone, and the mask token and heads when it has them
    (they must be the configured heads' sizes); what it lacks keeps its fresh init."""
    with torch.device("meta"):
        reference = DinoModel(config.backbone, config.heads).state_dict()
    state = {f"backbone.vit.{k}": v for k, v in start.backbone.items()}
    if start.mask_token is not None:
        state["backbone.mask_token"] = start.mask_token.reshape(reference["backbone.mask_token"].shape)
    if start.heads is not None:
        for head in ("dino", "ibot"):
            key = f"{head}_head.last_layer.weight"
            found, want = start.heads.get(key), reference[key]
            if found is not None and tuple(found.shape) != tuple(want.shape):
                raise InputError(f"{flag} {start.spec}", f"has a {head.upper() if head == 'ibot' else 'DINO'} head "
                                 f"of {found.shape[0]} prototypes (bottleneck {found.shape[1]})",
                                 f"heads.{head}_prototypes={want.shape[0]} and heads.{head}_bottleneck={want.shape[1]} "
                                 f"as configured, or --set heads.{head}_prototypes={found.shape[0]} (and the "
                                 "hidden/bottleneck sizes) to keep the checkpoint's heads")
        state |= start.heads
    _check_shapes(state, {k: v for k, v in reference.items() if k in state or k.startswith("backbone.vit.")},
                  f"{flag} {start.spec}")
    return state


def starting_backbone(start: StartingWeights, config: DinoConfig) -> Backbone:
    """The starting backbone, frozen: the Gram teacher of a run anchored to where it started."""
    backbone = Backbone(config.backbone)
    backbone.vit.load_state_dict(start.backbone, strict=True)
    return backbone.eval().requires_grad_(False)
