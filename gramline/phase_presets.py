"""Configs and presets of the three post-training phases: anchor, gram, highres (reference §1.5, §4, §6).

The gram and highres stages continue an existing run, so their config starts from that run's
resolved config (its manifest) and the stage preset only says what the phase changes:

    run config (schedules pinned, see below) ← phase preset ← what `phase.*` derives ← --config ← --set

- **gram** (`GramStageConfig`): continues the run at its last step S. Its `phase` section counts
  from the phase start: `phase.steps` steps are added (train.steps = S + phase.steps), the Gram
  weight ramps 0 → `phase.weight` and the DINO local weight from its value at S to
  `phase.local_weight` over `phase.ramp_steps` (a half-cosine ramp, as in the recipe), the Gram
  teacher is refreshed from the EMA teacher after the phase steps in `phase.refresh_at`, and an
  optional `phase.lr` replaces the run's LR schedule from S on. The derived SSLConfig fields are
  absolute step counts, as the engine uses them (the recipe counts its Gram phase from 0 to 1.2M
  and switches Gram on at 1M); an explicit `--set gram.weight=...` is absolute too and wins.
  Schedules the phase does not touch carry on: a schedule whose cosine ran "to the end of
  training" is pinned to the run's length, so it holds its end value instead of being stretched.
- **highres** (`HighresStageConfig`): a new run (steps from 0) initialised from a teacher. Each step
  uses one (global, local, Gram) resolution set of `phase.resolutions`, drawn with their weights
  by a seeded generator of the step number (the same on every rank); the Gram teacher sees
  `phase.gram_size_factor` x the global size unless a set names its own `gram_size`. Every
  schedule comes from the preset (the run's are dropped).
- **anchor** (`AnchorConfig`): which teacher checkpoint becomes the Gram teacher: `anchor.step`, or
  (default) the best by label-free dense quality on the dataset's eval split.

Sizes follow the SSL presets (tiny, vits16, vitb16, vitl16, vit7b16). The 7B values are the
recipe's (gram_anchor and high_res_adapt configs); the official code configures these phases for
7B only (issue #122), so the S/B/L values are scaled-down choices of ours, not tuned.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError, model_validator

from gramline.config import Schedule, SSLConfig, Strict, deep_merge, resolve_config
from gramline.errors import InputError

SIZES = ("tiny", "vits16", "vitb16", "vitl16", "vit7b16")
SCHEDULE_PATHS = (("optim", "lr"), ("optim", "weight_decay"), ("ema", "momentum"), ("loss", "teacher_temp"),
                  ("loss", "local_weight"), ("gram", "weight"))


def schedule(**values: float) -> dict[str, Any]:
    """A fully specified schedule tree (so merging never mixes in keys of an older schedule)."""
    return Schedule(**values).model_dump()


# --------------------------------------------------------------------------- config classes


class GramPhase(Strict):
    """The gram phase, counted from its first step (S = the continued run's last step)."""

    steps: int = 100  # steps this stage adds to the run
    weight: float = 2.0  # Gram loss weight reached after the ramp
    ramp_steps: int = 100  # half-cosine ramp of the Gram weight (0 → weight) and DINO local weight
    local_weight: float = 0.5  # DINO local-crop weight reached after the ramp
    refresh_at: list[int] = []  # phase steps after which the Gram teacher becomes a copy of the EMA teacher
    ema_teacher: bool = False  # anchor to the live EMA teacher itself instead of a frozen checkpoint
    gram_size_factor: float = 2.0  # Gram-teacher crop side / global crop side
    lr: Schedule | None = None  # LR schedule of the phase (counted from S); None: the run's carries on


class GramStageConfig(SSLConfig):
    phase: GramPhase = GramPhase()

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
        return self


class ResolutionSet(Strict):
    global_size: int
    local_size: int
    gram_size: int | None = None  # default: phase.gram_size_factor x global_size
    weight: float = 1.0  # relative probability of the set


class HighresPhase(Strict):
    resolutions: list[ResolutionSet] = []
    gram_size_factor: float = 1.5
    koleo_group_size: int | None = 16  # KoLeo neighbours searched in groups over ranks; None: per-rank batch
    mixture_seed: int = 65537  # the recipe's seed for the per-step resolution draw


class HighresStageConfig(SSLConfig):
    phase: HighresPhase = HighresPhase()

    def gram_size_of(self, index: int) -> int:
        res = self.phase.resolutions[index]
        if res.gram_size is not None:
            return res.gram_size
        return round(res.global_size * self.phase.gram_size_factor)

    @model_validator(mode="after")
    def _phase_ok(self) -> HighresStageConfig:
        from gramline.models.presets import ARCHS

        p = self.phase
        if not p.resolutions:
            raise ValueError("phase.resolutions is empty; give at least one {global_size, local_size} set")
        if p.koleo_group_size is not None and p.koleo_group_size < 2:
            raise ValueError(f"phase.koleo_group_size={p.koleo_group_size} must be >= 2 (or null)")
        patch = ARCHS[self.backbone.arch].patch_size
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


class AnchorSettings(Strict):
    step: int | None = None  # take the teacher checkpoint of this step; None: choose by dense quality
    min_step: int = 0  # candidates for the dense choice: checkpoints with min_step <= step <= max_step
    max_step: int | None = None
    images: int = 64  # eval images scored per candidate
    size: int | None = None  # input side (default: the run's crops.global_size)
    crop_fractions: list[float] = [0.5, 0.7]  # correspondence crop sizes, averaged
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


# --------------------------------------------------------------------------- presets

from gramline.presets import PRESETS  # noqa: E402  (transitional)

GRAM_PRESETS = PRESETS["gram"]
HIGHRES_PRESETS = PRESETS["highres"]
ANCHOR_PRESETS = PRESETS["anchor"]


def _preset(table: Mapping[str, dict], stage: str, name: str) -> dict[str, Any]:
    if name not in table:
        raise InputError("--preset", f"{name!r} has no {stage} preset", "one of " + ", ".join(sorted(table)))
    return copy.deepcopy(table[name])


# --------------------------------------------------------------------------- loaders


def pin_schedules(config: SSLConfig) -> SSLConfig:
    """Fix every schedule's cosine length to the run's own length, so a run continued past
    `train.steps` holds each schedule at its end value instead of stretching the cosine."""
    total = config.train.steps
    updates: dict[str, Any] = {}
    for section, name in SCHEDULE_PATHS:
        sched: Schedule = getattr(getattr(config, section), name)
        if sched.cosine_steps is None:
            pinned = sched.model_copy(update={"cosine_steps": max(0, total - sched.delay_steps - sched.warmup_steps)})
            updates.setdefault(section, {})[name] = pinned
    return config.model_copy(update={section: getattr(config, section).model_copy(update=values)
                                     for section, values in updates.items()})


def _run_tree(run_config: Mapping[str, Any], flag: str) -> dict[str, Any]:
    """The SSL part of a run's recorded config (a phase section of an earlier stage is dropped)."""
    if not run_config:
        raise InputError(f"{flag} manifest.json", "records no training config",
                         "a Model artifact written by a gramline SSL stage (pretrain, gram, highres)")
    tree = {k: copy.deepcopy(v) for k, v in run_config.items() if k != "phase"}
    try:
        return SSLConfig.model_validate(tree).model_dump(mode="json")
    except ValidationError as err:  # e.g. an anchor artifact, or a manifest of another version
        first = err.errors()[0]
        detail = f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
        raise InputError(f"{flag} manifest.json", f"records a config that is not an SSL training config ({detail})",
                         "a Model artifact written by a gramline SSL stage (pretrain, gram, highres)") from err


def load_gram_config(preset: str, config_file: Path | str | None, overrides: Sequence[str],
                     run_config: Mapping[str, Any], start_step: int, flag: str = "--model") -> GramStageConfig:
    """The gram stage's config for a run (its manifest `config`) continued from `start_step`."""
    run = pin_schedules(SSLConfig.model_validate(_run_tree(run_config, flag)))
    base = deep_merge(run.model_dump(mode="json"), {"preset": preset, **_preset(GRAM_PRESETS, "gram", preset)})
    first = resolve_config(GramStageConfig, base, config_file, overrides)
    derived = derive_gram(first, run, start_step)
    return resolve_config(GramStageConfig, deep_merge(base, derived), config_file, overrides)


def derive_gram(config: GramStageConfig, run: SSLConfig, start: int) -> dict[str, Any]:
    """Absolute SSLConfig values implied by the phase section (see the module docstring)."""
    from gramline.models.presets import ARCHS

    p = config.phase
    patch = ARCHS[config.backbone.arch].patch_size
    exact = config.crops.global_size * p.gram_size_factor
    gram_size = round(exact)
    if gram_size % patch or abs(gram_size - exact) > 1e-6:
        raise InputError("config field 'phase.gram_size_factor'",
                         f"{p.gram_size_factor} x crops.global_size {config.crops.global_size} = {exact:g} is not a "
                         f"multiple of the patch size {patch}", "a factor that gives a multiple of the patch size")
    local_now = run.loss.local_weight.at(start, run.train.steps)
    tree: dict[str, Any] = {
        "train": {"steps": start + p.steps},
        "crops": {"gram_size": gram_size},
        "gram": {"enabled": True, "weight": schedule(start=0.0, peak=0.0, end=p.weight, cosine_steps=p.ramp_steps,
                                                     delay_steps=start)},
        "loss": {"local_weight": schedule(start=local_now, peak=local_now, end=p.local_weight,
                                          cosine_steps=p.ramp_steps, delay_steps=start)},
    }
    if p.lr is not None:
        tree["optim"] = {"lr": p.lr.model_copy(update={"delay_steps": p.lr.delay_steps + start}).model_dump()}
    return tree


def load_highres_config(preset: str, config_file: Path | str | None, overrides: Sequence[str],
                        run_config: Mapping[str, Any], flag: str = "--model") -> HighresStageConfig:
    """The highres stage's config: the source run's architecture and recipe, the preset's phase."""
    tree = _run_tree(run_config, flag)
    for section, name in SCHEDULE_PATHS:  # a new run: every schedule comes from the preset
        tree.get(section, {}).pop(name, None)
    phase_preset = _preset(HIGHRES_PRESETS, "highres", preset)
    base = deep_merge(tree, {"preset": preset, **phase_preset})
    # crops = the first resolution set, as the preset has it, then as the overrides leave it
    first = resolve_config(HighresStageConfig, deep_merge(base, _first_set_crops(phase_preset["phase"])),
                           config_file, overrides)
    derived = _first_set_crops(first.phase.model_dump())
    return resolve_config(HighresStageConfig, deep_merge(base, derived), config_file, overrides)


def _first_set_crops(phase: Mapping[str, Any]) -> dict[str, Any]:
    """crops.{global,local,gram}_size of the first resolution set (SSLConfig validates crops)."""
    if not phase.get("resolutions"):
        return {}
    res = phase["resolutions"][0]
    gram = res.get("gram_size") or round(res["global_size"] * phase.get("gram_size_factor", 1.5))
    return {"crops": {"global_size": res["global_size"], "local_size": res["local_size"], "gram_size": gram}}


def load_anchor_config(preset: str, config_file: Path | str | None, overrides: Sequence[str]) -> AnchorConfig:
    return resolve_config(AnchorConfig, {"preset": preset, **_preset(ANCHOR_PRESETS, "anchor", preset)},
                          config_file, overrides)
