"""Configs of the DINO recipe's three stages: pretrain, gram and highres (DINOv3 paper §3-4, §6).

- `DinoConfig` (pretrain): everything one DINO + iBOT + KoLeo run needs; schedules count from step
  0 over `train.steps`.
- `GramStageConfig` (gram): continues a run at its last step S. Its sections are the run's recorded
  config (its schedules carry on at the run's own step, over the run's `train.steps`, as the
  official Gram config defines every schedule from iteration 0), over which the gram preset, the
  file and the overrides apply. `phase` counts from S: the stage adds `phase.steps` steps; the Gram
  weight ramps 0 → `phase.weight` and the DINO local weight from the run's value at S to
  `phase.local_weight` over `phase.ramp_steps`; `phase.lr`, when given, replaces the LR from S on.
  The recipe reads these when it knows S (`DinoSchedules.continuing`), not at config time.
- `HighresStageConfig` (highres): a new run initialised from a teacher. Each step uses one (global,
  local, Gram) resolution set of `phase.resolutions`; `crops` holds the first set's sizes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from gramline.config import Strict, load_stage_config
from gramline.data.config import CropsConfig
from gramline.errors import InputError
from gramline.models.archs import ARCHS
from gramline.models.config import BackboneConfig, HeadsConfig
from gramline.train.config import CropTrainingConfig
from gramline.train.schedules import Schedule

# every scheduled value of a DINO run, as (section, field)
SCHEDULE_PATHS = (("optim", "lr"), ("optim", "weight_decay"), ("ema", "momentum"), ("loss", "teacher_temp"),
                  ("loss", "local_weight"), ("gram", "weight"))


class LossConfig(Strict):
    dino_weight: float = 1.0
    koleo_weight: float = 0.1
    ibot_weight: float = 1.0
    student_temp: float = 0.1
    teacher_temp: Schedule = Schedule(start=0.04, peak=0.07, end=0.07, warmup_steps=30)
    local_weight: Schedule = Schedule.constant(1.0)  # weight of the DINO term on local crops
    sinkhorn_iters: int = 3
    koleo_group_size: int | None = None  # KoLeo neighbours searched in groups over ranks; None: per rank


class GramConfig(Strict):
    enabled: bool = False  # the Gram term and teacher (gram and highres stages)
    weight: Schedule = Schedule.constant(0.0)
    img_level: bool = True
    normalize: bool = True
    remove_neg: bool = False
    remove_only_teacher_neg: bool = False
    resize_antialias: bool = False


class InitConfig(Strict):
    """A run that starts from existing weights (pretrain --init-from; the `adapt` presets)."""

    # when the starting weights have no DINO/iBOT heads: the first steps train the new heads only
    # (the backbone gets LR 0 and its EMA copy stays as loaded); ignored when the heads are loaded
    head_warmup_steps: int = 0


class DinoConfig(CropTrainingConfig):
    backbone: BackboneConfig = BackboneConfig()
    heads: HeadsConfig = HeadsConfig()
    loss: LossConfig = LossConfig()
    gram: GramConfig = GramConfig()
    init: InitConfig = InitConfig()

    @property
    def patch_size(self) -> int:
        return ARCHS[self.backbone.arch].patch_size

    @model_validator(mode="after")
    def _consistent(self) -> DinoConfig:
        if self.backbone.arch not in ARCHS:
            raise ValueError(f"backbone.arch {self.backbone.arch!r} is unknown; expected one of {sorted(ARCHS)}")
        patch = self.patch_size
        crops = self.crops
        for name, size in (("crops.global_size", crops.global_size), ("crops.local_size", crops.local_size),
                           ("crops.gram_size", crops.gram_size)):
            if size is not None and (size <= 0 or size % patch):
                raise ValueError(f"{name}={size} is not a positive multiple of the patch size {patch}")
        if self.loss.koleo_group_size is not None and self.loss.koleo_group_size < 2:
            raise ValueError(f"loss.koleo_group_size={self.loss.koleo_group_size} must be >= 2 (or null)")
        if self.gram.enabled and crops.gram_size is None:
            raise ValueError("gram.enabled needs crops.gram_size (the Gram teacher's crop size)")
        if not 0 <= self.init.head_warmup_steps < self.train.steps:
            raise ValueError(f"init.head_warmup_steps={self.init.head_warmup_steps} must be >= 0 and below "
                             f"train.steps={self.train.steps}")
        return self


# --------------------------------------------------------------------------- gram


class GramPhase(Strict):
    """The gram phase, counted from its first step S (the continued run's last step)."""

    steps: int = 100  # steps this stage adds to the run
    weight: float = 2.0  # Gram loss weight reached after the ramp
    ramp_steps: int = 100  # half-cosine ramp of the Gram weight (0 → weight) and the DINO local weight
    local_weight: float = 0.5  # DINO local-crop weight reached after the ramp
    refresh_at: list[int] = Field(default_factory=list)  # phase steps after which the Gram teacher becomes a copy of the EMA teacher
    ema_teacher: bool = False  # anchor to the live EMA teacher itself instead of a frozen checkpoint
    gram_size_factor: float = 2.0  # Gram-teacher crop side / global crop side
    lr: Schedule | None = None  # LR schedule counted from S; None: the run's carries on


def _nested(data: Any, section: str) -> dict[str, Any]:
    value = data.get(section) if isinstance(data, dict) else None
    if isinstance(value, Strict):
        return value.model_dump()
    return dict(value or {})


class GramStageConfig(DinoConfig):
    phase: GramPhase = GramPhase()

    @model_validator(mode="before")
    @classmethod
    def _gram_crops(cls, data: Any) -> Any:
        """crops.gram_size = phase.gram_size_factor x crops.global_size, unless given."""
        if not isinstance(data, dict):
            return data
        crops, phase = _nested(data, "crops"), _nested(data, "phase")
        if crops.get("gram_size") is None:
            factor = float(phase.get("gram_size_factor", GramPhase().gram_size_factor))
            exact = int(crops.get("global_size", CropsConfig().global_size)) * factor
            arch = ARCHS.get(_nested(data, "backbone").get("arch", BackboneConfig().arch))
            if arch is None:
                return data  # DinoConfig names the unknown architecture
            if abs(round(exact) - exact) > 1e-6 or round(exact) % arch.patch_size:
                raise ValueError(f"phase.gram_size_factor {factor} x crops.global_size = {exact:g} is not a "
                                 f"multiple of the patch size {arch.patch_size}; choose a factor that gives one")
            data = {**data, "crops": {**crops, "gram_size": round(exact)}}
        return data

    @model_validator(mode="after")
    def _phase_ok(self) -> GramStageConfig:
        p = self.phase
        if p.steps <= 0 or p.ramp_steps < 0 or p.weight < 0 or p.gram_size_factor <= 0:
            raise ValueError("phase.steps must be > 0, phase.ramp_steps >= 0, phase.weight >= 0 and "
                             "phase.gram_size_factor > 0")
        bad = [s for s in p.refresh_at if not 1 <= s <= p.steps]
        if bad:
            raise ValueError(f"phase.refresh_at={p.refresh_at} has steps outside 1..phase.steps={p.steps}: {bad}")
        if p.ema_teacher and p.refresh_at:
            raise ValueError("phase.ema_teacher and phase.refresh_at exclude each other (the EMA teacher "
                             "needs no refresh)")
        for section, name, knobs in (("gram", "weight", "phase.weight and phase.ramp_steps"),
                                     ("loss", "local_weight", "phase.local_weight and phase.ramp_steps")):
            if name in getattr(self, section).model_fields_set:
                raise ValueError(f"{section}.{name} is the gram phase's ramp here: set {knobs} instead")
        return self


# --------------------------------------------------------------------------- highres


class ResolutionSet(Strict):
    global_size: int
    local_size: int
    gram_size: int | None = None  # default: phase.gram_size_factor x global_size
    weight: float = 1.0  # relative probability of the set


class HighresPhase(Strict):
    resolutions: list[ResolutionSet] = Field(default_factory=list)
    gram_size_factor: float = 1.5
    mixture_seed: int = 65537  # the official seed of the per-step resolution draw


def gram_size_of(resolution: Mapping[str, Any], factor: float) -> int:
    """A resolution set's Gram crop side: its own, or `factor` x its global side."""
    return resolution.get("gram_size") or round(resolution["global_size"] * factor)


class HighresStageConfig(DinoConfig):
    phase: HighresPhase = HighresPhase()

    @model_validator(mode="before")
    @classmethod
    def _first_set_crops(cls, data: Any) -> Any:
        """crops.{global,local,gram}_size are the first resolution set's (DinoConfig checks them)."""
        phase = _nested(data, "phase")
        sets = phase.get("resolutions") or []
        if not isinstance(data, dict) or not sets:
            return data
        first = sets[0] if isinstance(sets[0], dict) else sets[0].model_dump()
        factor = float(phase.get("gram_size_factor", HighresPhase().gram_size_factor))
        sizes = {"global_size": first["global_size"], "local_size": first["local_size"],
                 "gram_size": gram_size_of(first, factor)}
        arch = ARCHS.get(_nested(data, "backbone").get("arch", BackboneConfig().arch))
        if arch is None or any(not isinstance(v, int) or v <= 0 or v % arch.patch_size for v in sizes.values()):
            return data  # the phase check below names the set at fault
        return {**data, "crops": {**_nested(data, "crops"), **sizes}}

    def gram_size_of(self, index: int) -> int:
        res = self.phase.resolutions[index]
        return res.gram_size or round(res.global_size * self.phase.gram_size_factor)

    @model_validator(mode="after")
    def _phase_ok(self) -> HighresStageConfig:
        p = self.phase
        if not p.resolutions:
            raise ValueError("phase.resolutions is empty; give at least one {global_size, local_size} set")
        patch = self.patch_size
        for i, res in enumerate(p.resolutions):
            where = f"phase.resolutions[{i}]"
            if res.weight <= 0:
                raise ValueError(f"{where}.weight={res.weight} must be > 0")
            for name, size in (("global_size", res.global_size), ("local_size", res.local_size)):
                if size <= 0 or size % patch:
                    raise ValueError(f"{where}.{name}={size} is not a positive multiple of the patch size {patch}")
            if res.local_size >= res.global_size:
                raise ValueError(f"{where}.local_size={res.local_size} must be smaller than "
                                 f"global_size={res.global_size}")
            gram = self.gram_size_of(i)
            exact = res.gram_size is not None or abs(res.global_size * p.gram_size_factor - gram) < 1e-6
            if gram <= 0 or gram % patch or not exact:
                raise ValueError(f"{where}.gram_size={res.gram_size if res.gram_size is not None else 'auto'} "
                                 f"(= {res.global_size} x phase.gram_size_factor {p.gram_size_factor}) is not a "
                                 f"positive multiple of the patch size {patch}; set {where}.gram_size explicitly")
        return self


# --------------------------------------------------------------------------- loaders


def load_pretrain_config(preset: str, config_file: Path | str | None = None,
                         overrides: Sequence[str] = ()) -> DinoConfig:
    return load_stage_config(DinoConfig, "pretrain", preset, config_file, overrides)


def load_adapt_config(preset: str, config_file: Path | str | None = None, overrides: Sequence[str] = (),
                      arch: str | None = None, heads_loaded: bool = False) -> DinoConfig:
    """pretrain --init-from: the `adapt` preset ← file ← overrides; then what the starting weights
    decide: their architecture (`arch`), and no head warm-up when they bring their heads. Without the
    Gram anchor (`gram.enabled=false`) no Gram-teacher crops are made."""
    decided = [f"backbone.arch={arch}"] if arch else []
    if heads_loaded:
        decided.append("init.head_warmup_steps=0")
    config = load_stage_config(DinoConfig, "adapt", preset, config_file, [*overrides, *decided])
    if not config.gram.enabled and config.crops.gram_size is not None:
        config = load_stage_config(DinoConfig, "adapt", preset, config_file, [*overrides, *decided, "crops.gram_size=null"])
    return config


def run_tree(run_config: Mapping[str, Any], flag: str) -> dict[str, Any]:
    """The DINO part of a run's recorded config (an earlier stage's phase section, how that run
    started and what it exported are dropped: they describe that run, not the one continuing it)."""
    if not run_config:
        raise InputError(f"{flag} manifest.json", "records no training config",
                         "a Model artifact written by a gramline DINO stage (pretrain, gram, highres)")
    tree = {k: copy.deepcopy(v) for k, v in run_config.items() if k not in ("phase", "init")}
    if isinstance(tree.get("train"), dict):
        tree["train"].pop("export", None)
    try:
        return DinoConfig.model_validate(tree).model_dump(mode="json")
    except ValidationError as err:  # e.g. an anchor artifact, or a manifest of another version
        first = err.errors()[0]
        detail = f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
        raise InputError(f"{flag} manifest.json", f"records a config that is not a DINO training config ({detail})",
                         "a Model artifact written by a gramline DINO stage (pretrain, gram, highres)") from err


def load_gram_config(preset: str, config_file: Path | str | None, overrides: Sequence[str],
                     run_config: Mapping[str, Any], flag: str = "--model") -> GramStageConfig:
    """The gram stage's config for a run (its manifest `config`); the phase's ramps replace the run's
    Gram and DINO local weights, so those two are not carried over."""
    tree = run_tree(run_config, flag)
    tree["gram"].pop("weight", None)
    tree["loss"].pop("local_weight", None)
    return load_stage_config(GramStageConfig, "gram", preset, config_file, overrides, base=tree)


def load_highres_config(preset: str, config_file: Path | str | None, overrides: Sequence[str],
                        run_config: Mapping[str, Any], flag: str = "--model") -> HighresStageConfig:
    """The highres stage's config: the source run's architecture and recipe, the preset's schedules
    and phase (a new run: no schedule of the source run is carried over)."""
    tree = run_tree(run_config, flag)
    for section, name in SCHEDULE_PATHS:
        tree.get(section, {}).pop(name, None)
    return load_stage_config(HighresStageConfig, "highres", preset, config_file, overrides, base=tree)
