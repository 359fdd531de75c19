"""The align stage's config: LiT text alignment on a frozen backbone (DINOv3 paper §6, "dino.txt";
official `dinov3/eval/text/`, `dinov3/eval/text/configs/dinov3_vitl_text.yaml`).

`head` and `text` size the two trainable towers (gramline.models.config); `loss` the learnable
temperature; `optim` AdamW (LR warmup then cosine to 0, one weight decay, none for 1-d parameters);
`images` the training transform (RandomResizedCrop + flip, or resize only); `align` what to align
(which student of a distill output) and the shuffled-caption control.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from pydantic import model_validator

from gramline.config import Strict, load_stage_config
from gramline.data.config import LoaderConfig
from gramline.models.config import TextTowerConfig, VisionHeadConfig
from gramline.train.config import TrainConfig, check_ddp_without_teacher_checkpoints
from gramline.train.schedules import Schedule


class AlignSettings(Strict):
    student: str | None = None  # for a distill output as --model: which student (None: the largest)
    # The control run: every training image is paired with another image's caption (a fixed
    # permutation), so whatever the model then learns does not come from the text.
    shuffle_captions: bool = False


class ContrastiveLossConfig(Strict):
    init_logit_scale: float = math.log(1 / 0.07)  # ln of the inverse temperature
    max_logit_scale: float = math.log(100)  # clamped to [0, this] after every step


class AlignOptimConfig(Strict):
    lr: Schedule = Schedule(start=0.0, peak=7e-4, end=0.0, warmup_steps=2000)
    weight_decay: float = 1e-4  # 0 for parameters with fewer than 2 dimensions (norms, biases, logit scale)
    betas: tuple[float, float] = (0.9, 0.99)
    clip_grad: float = 0.0  # max gradient norm over all trainable parameters; <= 0: none


class AlignImagesConfig(Strict):
    size: int | None = None  # training input side (None: the backbone's own)
    augment: bool = True  # RandomResizedCrop + horizontal flip; False: the whole image resized
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop's area range (torchvision's default)


class AlignConfig(Strict):
    preset: str = "custom"
    align: AlignSettings = AlignSettings()
    head: VisionHeadConfig = VisionHeadConfig()
    text: TextTowerConfig = TextTowerConfig()
    loss: ContrastiveLossConfig = ContrastiveLossConfig()
    optim: AlignOptimConfig = AlignOptimConfig()
    images: AlignImagesConfig = AlignImagesConfig()
    data: LoaderConfig = LoaderConfig()
    train: TrainConfig = TrainConfig(teacher_checkpoint_every=0)

    @model_validator(mode="after")
    def _consistent(self) -> AlignConfig:
        if not 0 <= self.loss.init_logit_scale <= self.loss.max_logit_scale:
            raise ValueError(f"loss.init_logit_scale={self.loss.init_logit_scale} must lie in [0, "
                             f"loss.max_logit_scale={self.loss.max_logit_scale}]")
        low, high = self.images.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"images.crop_scale={self.images.crop_scale} must satisfy 0 < low <= high <= 1")
        if self.images.size is not None and self.images.size <= 0:
            raise ValueError(f"images.size={self.images.size} must be > 0 (or null: the backbone's own)")
        if self.head.blocks < 1 or self.text.layers < 1:
            raise ValueError("head.blocks and text.layers must be >= 1")
        if self.text.context_length < 3:
            raise ValueError(f"text.context_length={self.text.context_length} must be >= 3 (start, a token, end)")
        check_ddp_without_teacher_checkpoints(self.train, "align", "trains its towers with DDP (the backbone is "
                                              "frozen and replicated)")
        return self


def load_align_config(preset: str, config_file: Path | str | None, overrides: Sequence[str]) -> AlignConfig:
    return load_stage_config(AlignConfig, "align", preset, config_file, overrides)
