"""What the gram and highres stages share: reading the run they continue, the Gram teacher
(loading, refresh from the EMA teacher, or the EMA teacher itself) and the resolution mixture.

Reference §1.5 (Gram teacher source and refresh), §4 (high-res mixture), §6.2-6.3 (how the phases
chain). Every check of an input names the flag and file at fault (InputError, exit 2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from gramline.artifacts import read_manifest
from gramline.config import SSLConfig
from gramline.data.augment import MultiCropAugment
from gramline.errors import InputError
from gramline.models.backbone import Backbone
from gramline.models.io import BACKBONE_FILE, HEADS_FILE
from gramline.models.presets import ARCHS
from gramline.phase_presets import HighresStageConfig
from gramline.train.checkpoint import STEP_DIR, latest_checkpoint
from gramline.train.engine import GramTeacher, SSLTrainer
from gramline.train.model import SSLModel

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


def _check_arch(manifest: Mapping[str, Any], config: SSLConfig, flag: str, model_dir: Path) -> None:
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
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    wrong = sorted(k for k in set(state) & set(reference) if tuple(state[k].shape) != tuple(reference[k].shape))
    if missing or unexpected or wrong:
        detail = "; ".join(f"{name}: {keys[:3]}{' ...' if len(keys) > 3 else ''}" for name, keys in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)
        raise InputError(where, f"does not fit the configured model ({detail})",
                         "weights of the same architecture and heads as the config")


def load_gram_backbone(model_dir: Path, config: SSLConfig, flag: str = "--anchor") -> Backbone:
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
    """The manifest of a Model that carries a whole SSL teacher (backbone and heads)."""
    model_dir = Path(model_dir)
    manifest = model_manifest(model_dir, flag)
    if not (model_dir / BACKBONE_FILE).is_file() or not (model_dir / HEADS_FILE).is_file():
        raise InputError(f"{flag} {model_dir}", f"lacks {BACKBONE_FILE} or {HEADS_FILE}",
                         "a Model from an SSL training stage (gram or pretrain), which carries its heads; an anchor "
                         "artifact has the backbone only")
    return manifest


def ssl_state_from_model(model_dir: Path, config: SSLConfig, flag: str = "--model") -> dict[str, Tensor]:
    """SSLModel weights (backbone + mask token + DINO/iBOT heads) from a Model artifact's teacher."""
    model_dir = Path(model_dir)
    manifest = require_teacher_with_heads(model_dir, flag)
    _check_arch(manifest, config, flag, model_dir)
    heads_file = model_dir / HEADS_FILE
    state = {f"backbone.vit.{k}": v for k, v in load_file(str(model_dir / BACKBONE_FILE)).items()}
    for key, value in load_file(str(heads_file)).items():
        state["backbone.mask_token" if key == "mask_token" else key] = value
    with torch.device("meta"):
        reference = SSLModel(config).state_dict()
    _check_shapes(state, reference, f"{flag} {model_dir}")
    return state


# --------------------------------------------------------------------------- continuing a run


def continue_run(trainer: SSLTrainer, run_dir: Path, flag: str = "--model") -> int:
    """Load a run's latest training state (student, teacher, optimizer, step, RNG) into a fresh
    trainer, so this stage keeps counting from that step; returns the step."""
    step, path = latest_run_state(run_dir, flag)
    with torch.device("meta"):
        reference = SSLModel(trainer.config).state_dict()
    saved = torch.load(path / "model.pt", map_location="cpu", weights_only=True, mmap=True)
    _check_shapes(saved["student"], reference, f"{flag} {run_dir} ({path.name})")
    del saved
    config = trainer.extra_state.get("config")
    if not trainer.try_resume(state_dir=Path(run_dir) / "state"):
        raise InputError(f"{flag} {run_dir}", "has no training checkpoint", "a run with state/step-* checkpoints")
    trainer.extra_state.pop("gram_refreshes", None)
    trainer.extra_state["config"] = config
    trainer.extra_state["continued_from"] = {"path": str(path), "step": step}
    return step


# --------------------------------------------------------------------------- the Gram teacher


@dataclass
class GramRefresh:
    """After-step hook: at each step in `steps` the Gram teacher becomes a hard copy of the EMA
    teacher's backbone (reference §1.5, `update_gram(m=0)`); the steps done are kept in the
    checkpointed `extra_state["gram_refreshes"]`."""

    steps: frozenset[int]

    def __call__(self, trainer: SSLTrainer, step: int) -> None:
        if step not in self.steps:
            return
        if trainer.gram_teacher is None:
            raise RuntimeError("GramRefresh needs a trainer with a Gram teacher")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(trainer.teacher, options=StateDictOptions(full_state_dict=True))
        prefix = "backbone."
        state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        with torch.no_grad():
            trainer.gram_teacher.backbone.load_state_dict(state, strict=True)
        refreshes = trainer.extra_state.setdefault("gram_refreshes", [])
        refreshes.append(step)
        if trainer.log_enabled:
            print(f"[{trainer.stage}] step {step}: Gram teacher refreshed from the EMA teacher "
                  f"(refresh {len(refreshes)})", flush=True)


def use_ema_teacher(trainer: SSLTrainer) -> None:
    """Anchor to the live EMA teacher (reference `gram.ema_teacher`). Here it sees the Gram crops
    (larger, undistorted) rather than reusing its forward on the global crops."""
    trainer.gram_teacher = GramTeacher(trainer.teacher.backbone).to(trainer.device)


# --------------------------------------------------------------------------- resolution mixture


@dataclass(frozen=True)
class MixtureChoice:
    """Which resolution set step s uses: a draw with the sets' weights from a generator seeded by
    (seed, s), so every rank and every resume agrees without communication."""

    weights: tuple[float, ...]
    seed: int

    def __call__(self, step: int) -> int:
        p = np.asarray(self.weights, dtype=np.float64)
        rng = np.random.default_rng([self.seed, int(step)])
        return int(rng.choice(len(p), p=p / p.sum()))


def mixture_augments(config: HighresStageConfig) -> list[MultiCropAugment]:
    """One multi-crop augmentation per resolution set (the rest of `crops` is shared)."""
    augments = []
    for i, res in enumerate(config.phase.resolutions):
        crops = config.crops.model_copy(update={"global_size": res.global_size, "local_size": res.local_size,
                                                "gram_size": config.gram_size_of(i)})
        augments.append(MultiCropAugment(crops))
    return augments


def mixture_choice(config: HighresStageConfig) -> MixtureChoice:
    return MixtureChoice(tuple(r.weight for r in config.phase.resolutions), config.phase.mixture_seed)


def resolution_counts(choice: MixtureChoice, steps: Sequence[int]) -> list[int]:
    counts = [0] * len(choice.weights)
    for step in steps:
        counts[choice(step)] += 1
    return counts
