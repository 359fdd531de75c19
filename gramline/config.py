"""Typed configs, named presets, YAML files and dotted `key=value` overrides, with clear errors.

Every stage builds its config the same way: preset defaults, then `--config FILE`, then each
`--set a.b=value` in order. Unknown keys, wrong types and impossible values raise InputError
naming the dotted field and what was expected (exit 2 at the CLI).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from gramline.errors import InputError

C = TypeVar("C", bound=BaseModel)


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- generic machinery


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise InputError(f"--set {item!r}", "has no '='", "key=value, e.g. optim.lr=1e-3")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise InputError(f"--set {item!r}", "has an empty key", "a dotted key such as train.steps")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string; users mean a number
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.split("."), value


def _set_dotted(tree: dict[str, Any], parts: list[str], value: Any, full: str) -> None:
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise InputError(f"config key {full!r}", f"{where!r} is a value, not a section", "a valid key")
        node = child
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = deep_merge(node[last], value)  # a mapping value updates the section, key by key
    else:
        node[last] = value


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _describe_validation_error(cls: type[BaseModel], err: ValidationError) -> InputError:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "<root>"
    kind = first["type"]
    if kind == "extra_forbidden":
        parent_loc = first["loc"][:-1]
        model: Any = cls
        for part in parent_loc:
            annotation = model.model_fields[str(part)].annotation if hasattr(model, "model_fields") else None
            model = annotation
        valid = sorted(model.model_fields) if hasattr(model, "model_fields") else []
        return InputError(f"config key {field!r}", "does not exist", "one of " + ", ".join(valid))
    message = first["msg"].removeprefix("Value error, ")
    if not first["loc"] or isinstance(first.get("input"), dict):
        # a cross-field check: its message names the fields involved
        where = "config" if not first["loc"] else f"config section {field!r}"
        return InputError(where, message)
    return InputError(f"config field {field!r}", f"got {first.get('input')!r}: {message}")


def load_yaml_file(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--config {path}", "does not exist", "a YAML config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise InputError(f"--config {path}", f"is not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise InputError(f"--config {path}", "is not a mapping", "a YAML mapping of config sections")
    return data


def resolve_config(
    cls: type[C],
    base: Mapping[str, Any] | None = None,
    config_file: Path | str | None = None,
    overrides: Sequence[str] = (),
) -> C:
    """Build `cls` from defaults ← `base` (preset) ← YAML file ← dotted overrides, validating once."""
    tree: dict[str, Any] = dict(copy.deepcopy(base or {}))
    if config_file:
        tree = deep_merge(tree, load_yaml_file(config_file))
    for item in overrides:
        parts, value = parse_override(item)
        _set_dotted(tree, parts, value, item.split("=", 1)[0])
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        raise _describe_validation_error(cls, err) from None


def dump_config(config: BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")


def load_stage_config(cls: type[C], stage: str, preset: str, config_file: Path | str | None = None,
                      overrides: Sequence[str] = (), base: Mapping[str, Any] | None = None) -> C:
    """A stage's config: `base` (e.g. the config of the run a stage continues) ← the stage's preset
    `PRESETS[stage][preset]` ← YAML file ← dotted overrides."""
    from gramline.presets import stage_preset

    return resolve_config(cls, deep_merge(dict(base or {}), stage_preset(stage, preset)), config_file, overrides)


# --------------------------------------------------------------------------- SSL recipe config


class Schedule(Strict):
    """`linear_warmup_cosine_decay` of the recipe (reference §2): start→peak linearly over
    `warmup_steps`, then a half cosine peak→end over `cosine_steps` (default: the rest), then
    `end`. peak == end gives DINOv3's warmup-then-constant; start == peak == 0 with a delay
    (`delay_steps`) gives the Gram weight's late switch-on."""

    start: float = 0.0
    peak: float = 0.0
    end: float = 0.0
    warmup_steps: int = 0
    cosine_steps: int | None = None
    delay_steps: int = 0

    @model_validator(mode="before")
    @classmethod
    def _scalar_is_constant(cls, data: Any) -> Any:
        """`optim.lr=3e-4` means a constant schedule."""
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return {"start": data, "peak": data, "end": data}
        return data

    @model_validator(mode="after")
    def _non_negative(self) -> "Schedule":
        if self.warmup_steps < 0 or self.delay_steps < 0 or (self.cosine_steps or 0) < 0:
            raise ValueError("warmup_steps, cosine_steps and delay_steps must be >= 0")
        return self

    @classmethod
    def constant(cls, value: float) -> "Schedule":
        return cls(start=value, peak=value, end=value)

    def at(self, step: int, total_steps: int) -> float:
        step -= self.delay_steps
        if step < 0:
            return self.start
        if step < self.warmup_steps:
            return self.start + (self.peak - self.start) * step / self.warmup_steps
        cosine = self.cosine_steps if self.cosine_steps is not None else total_steps - self.delay_steps - self.warmup_steps
        t = step - self.warmup_steps
        if cosine <= 0 or t >= cosine:
            return self.end
        return self.end + 0.5 * (self.peak - self.end) * (1 + math.cos(math.pi * t / cosine))


class BackboneConfig(Strict):
    arch: str = "tiny"
    img_size: int = 64
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = True
    rope_rescale_coords: float | None = 2.0
    layerscale_init: float = 1e-5


class HeadsConfig(Strict):
    dino_hidden: int = 2048
    dino_bottleneck: int = 256
    dino_prototypes: int = 65536
    ibot_hidden: int = 2048
    ibot_bottleneck: int = 256
    ibot_prototypes: int = 65536
    nlayers: int = 3
    # the recipe's trunc-normal std (0.02); a larger one gives the un-normalised prototype layer
    # (no weight norm in DINOv3) a usable logit scale from step 0, which short runs need
    last_layer_init_std: float = 0.02


class CropsConfig(Strict):
    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    horizontal_flip: bool = True
    color_jitter_p: float = 0.8
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    grayscale_p: float = 0.2
    blur_mode: Literal["intended", "official"] = "intended"
    solarize_p: float = 0.2
    gram_size: int | None = None
    gram_no_distortions: bool = True


class MaskingConfig(Strict):
    sample_probability: float = 0.5
    min_ratio: float = 0.1
    max_ratio: float = 0.5


class LossConfig(Strict):
    dino_weight: float = 1.0
    koleo_weight: float = 0.1
    ibot_weight: float = 1.0
    student_temp: float = 0.1
    teacher_temp: Schedule = Schedule(start=0.04, peak=0.07, end=0.07, warmup_steps=30)
    local_weight: Schedule = Schedule.constant(1.0)
    sinkhorn_iters: int = 3


class GramConfig(Strict):
    enabled: bool = False
    weight: Schedule = Schedule.constant(0.0)
    img_level: bool = True
    normalize: bool = True
    remove_neg: bool = False
    remove_only_teacher_neg: bool = False
    resize_antialias: bool = False


class OptimConfig(Strict):
    lr: Schedule = Schedule(start=0.0, peak=1e-3, end=1e-6, warmup_steps=10)
    lr_scaling: Literal["sqrt_wrt_1024", "linear_wrt_256", "none"] = "sqrt_wrt_1024"
    weight_decay: Schedule = Schedule(start=0.04, peak=0.04, end=0.4)
    betas: tuple[float, float] = (0.9, 0.999)
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0
    freeze_last_layer_steps: int = 0


class EmaConfig(Strict):
    momentum: Schedule = Schedule(start=0.992, peak=0.992, end=1.0)


class DataConfig(Strict):
    sampling: Literal["shuffle", "resample"] = "shuffle"  # training streams never end
    shuffle_buffer: int = 512
    num_workers: int = 0


class TrainConfig(Strict):
    steps: int = 100
    batch_size: int = 32
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool = False
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    teacher_checkpoint_every: int = 50
    log_every: int = 10
    max_nan_steps: int = 2
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"


class SSLConfig(Strict):
    """Everything one SSL training run (pretrain, gram, highres) needs."""

    preset: str = "custom"
    backbone: BackboneConfig = BackboneConfig()
    heads: HeadsConfig = HeadsConfig()
    crops: CropsConfig = CropsConfig()
    masking: MaskingConfig = MaskingConfig()
    loss: LossConfig = LossConfig()
    gram: GramConfig = GramConfig()
    optim: OptimConfig = OptimConfig()
    ema: EmaConfig = EmaConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "SSLConfig":
        from gramline.models.presets import ARCHS  # local import: models import config

        if self.backbone.arch not in ARCHS:
            raise ValueError(f"backbone.arch {self.backbone.arch!r} is unknown; expected one of {sorted(ARCHS)}")
        patch = ARCHS[self.backbone.arch].patch_size
        crops = self.crops
        for name, size in (("crops.global_size", crops.global_size), ("crops.local_size", crops.local_size),
                           ("crops.gram_size", crops.gram_size)):
            if size is not None and (size <= 0 or size % patch):
                raise ValueError(f"{name}={size} is not a positive multiple of the patch size {patch}")
        if crops.local_size >= crops.global_size:
            raise ValueError(f"crops.local_size={crops.local_size} must be smaller than crops.global_size={crops.global_size}")
        if not 0 <= crops.n_local <= 32:
            raise ValueError(f"crops.n_local={crops.n_local} must be between 0 and 32")
        for name, (lo, hi) in (("crops.global_scale", crops.global_scale), ("crops.local_scale", crops.local_scale)):
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name}={[lo, hi]} must satisfy 0 < min <= max <= 1")
        m = self.masking
        if not (0 <= m.sample_probability <= 1 and 0 <= m.min_ratio <= m.max_ratio < 1):
            raise ValueError("masking needs 0 <= sample_probability <= 1 and 0 <= min_ratio <= max_ratio < 1")
        if self.train.steps <= 0 or self.train.batch_size < 2:
            raise ValueError("train.steps must be > 0 and train.batch_size >= 2 (KoLeo needs a neighbour)")
        if self.gram.enabled and crops.gram_size is None:
            raise ValueError("gram.enabled needs crops.gram_size (the Gram teacher's crop size)")
        return self


def load_ssl_config(preset: str, config_file: Path | str | None = None, overrides: Sequence[str] = ()) -> SSLConfig:
    return load_stage_config(SSLConfig, "pretrain", preset, config_file, overrides)
