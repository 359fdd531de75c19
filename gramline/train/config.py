"""Config sections every training recipe shares: the loop, the optimizer, the EMA teacher, and the
base of the multi-crop recipes' configs (DINO, distillation)."""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import field_validator, model_validator

from gramline.config import Strict
from gramline.data.config import CropsConfig, LoaderConfig, MaskingConfig
from gramline.train.schedules import Schedule


class OptimConfig(Strict):
    lr: Schedule = Schedule(start=0.0, peak=1e-3, end=1e-6, warmup_steps=10)
    lr_scaling: Literal["sqrt_wrt_1024", "linear_wrt_256", "none"] = "sqrt_wrt_1024"
    weight_decay: Schedule = Schedule(start=0.04, peak=0.04, end=0.4)
    betas: tuple[float, float] = (0.9, 0.999)
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0  # max gradient norm per module (backbone, each head); <= 0: no clipping
    freeze_last_layer_steps: int = 0  # the heads' prototype layers get LR 0 for this many steps


class EmaConfig(Strict):
    momentum: Schedule = Schedule(start=0.992, peak=0.992, end=1.0)


class LoggersConfig(Strict):
    """Where the logged values go besides metrics.jsonl (written by the main rank only)."""

    tensorboard: bool = True  # event files under <output Model>/tensorboard/
    mlflow_uri: str = ""  # an MLflow tracking URI (needs the `mlflow` extra); empty: no MLflow run

    @field_validator("mlflow_uri")
    @classmethod
    def _mlflow_installed(cls, uri: str) -> str:
        if uri and importlib.util.find_spec("mlflow") is None:
            raise ValueError("is set but the mlflow package is not installed; install gramline[mlflow] "
                             "or leave train.loggers.mlflow_uri empty")
        return uri


class ExportConfig(Strict):
    """What the output Model directory keeps besides the weights, manifest and logs once the run has
    succeeded: `state/` (the resumable checkpoints) and `checkpoints/` (the periodic teacher Models).
    `auto`: everything when the stage runs on its own (the output directory is also its work area: a
    start on it resumes from state/); in a pipeline task (--executor-output) only what the next
    stages read (pretrain's state/ for gram, its teacher checkpoints for anchor; nothing of the
    later stages), since the task's Model is uploaded and every consumer downloads it. A retried
    task resumes from --state-uri, where both are mirrored, not from its output."""

    state: Literal["auto", "keep", "drop"] = "auto"
    teacher_checkpoints: Literal["auto", "keep", "drop"] = "auto"


class TrainConfig(Strict):
    steps: int = 100
    batch_size: int = 32  # per process
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    # Periodic teacher Model artifacts under checkpoints/ (the anchor stage chooses among them):
    # every `teacher_checkpoint_every` steps when set (0: none), else `teacher_checkpoints` spread over
    # train.steps, so that a longer run does not multiply them; at most `keep_teacher_checkpoints` kept.
    teacher_checkpoint_every: int | None = None
    teacher_checkpoints: int = 4
    keep_teacher_checkpoints: int = 32
    log_every: int = 10
    max_nan_steps: int = 2  # consecutive non-finite losses tolerated (those steps are skipped)
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    # per transformer block: none; selective (matrix-product and attention outputs kept, the rest
    # recomputed in backward); full (only the block's input kept)
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    loggers: LoggersConfig = LoggersConfig()
    export: ExportConfig = ExportConfig()

    @model_validator(mode="after")
    def _positive(self) -> TrainConfig:
        if self.steps <= 0 or self.batch_size < 2:
            raise ValueError("train.steps must be > 0 and train.batch_size >= 2 (KoLeo needs a neighbour)")
        if (self.teacher_checkpoint_every or 0) < 0 or self.teacher_checkpoints < 0 or self.keep_teacher_checkpoints < 1:
            raise ValueError("train.teacher_checkpoint_every and train.teacher_checkpoints must be >= 0 and "
                             "train.keep_teacher_checkpoints >= 1")
        return self

    def teacher_every(self) -> int:
        """Steps between teacher checkpoints (0: none)."""
        if self.teacher_checkpoint_every is not None:
            return self.teacher_checkpoint_every
        return max(1, self.steps // self.teacher_checkpoints) if self.teacher_checkpoints else 0


def check_ddp_without_teacher_checkpoints(train: TrainConfig, stage: str, why_ddp: str) -> None:
    """For a stage that trains with DDP only and has no EMA teacher to snapshot (distill, align)."""
    if train.distributed == "fsdp":
        raise ValueError(f"train.distributed=fsdp: the {stage} stage {why_ddp}; use auto or ddp")
    if train.teacher_every():
        raise ValueError(f"train.teacher_checkpoint_every={train.teacher_checkpoint_every} with train.teacher_checkpoints="
                         f"{train.teacher_checkpoints}: the {stage} stage writes no periodic teacher checkpoints; set "
                         "train.teacher_checkpoint_every to 0")


class CropTrainingConfig(Strict):
    """What every multi-crop training stage has (the crop-batch source reads these sections); a
    recipe's config adds its model and loss sections and says which patch grid its masks use."""

    preset: str = "custom"
    crops: CropsConfig = CropsConfig()
    masking: MaskingConfig = MaskingConfig()
    optim: OptimConfig = OptimConfig()
    ema: EmaConfig = EmaConfig()
    data: LoaderConfig = LoaderConfig()
    train: TrainConfig = TrainConfig()

    @property
    def patch_size(self) -> int:
        raise NotImplementedError
