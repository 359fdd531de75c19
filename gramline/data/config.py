"""Config sections of the training data: multi-crop augmentation, iBOT masking, the loader."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from gramline.config import Strict


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
    gram_size: int | None = None  # side of the Gram teacher's crops (None: no Gram crops)
    gram_no_distortions: bool = True
    # where colour jitter, grayscale, blur, solarize and normalisation run: "cpu" in the data
    # workers, "device" batched on the training device, "auto" on the device when it is CUDA
    photometrics: Literal["auto", "cpu", "device"] = "auto"

    @model_validator(mode="after")
    def _consistent(self) -> CropsConfig:
        if self.local_size >= self.global_size:
            raise ValueError(f"crops.local_size={self.local_size} must be smaller than crops.global_size="
                             f"{self.global_size}")
        if not 0 <= self.n_local <= 32:
            raise ValueError(f"crops.n_local={self.n_local} must be between 0 and 32")
        for name, (lo, hi) in (("crops.global_scale", self.global_scale), ("crops.local_scale", self.local_scale)):
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name}={[lo, hi]} must satisfy 0 < min <= max <= 1")
        return self


class MaskingConfig(Strict):
    sample_probability: float = 0.5  # share of global crops that get a block mask
    min_ratio: float = 0.1
    max_ratio: float = 0.5

    @model_validator(mode="after")
    def _ratios(self) -> MaskingConfig:
        if not (0 <= self.sample_probability <= 1 and 0 <= self.min_ratio <= self.max_ratio < 1):
            raise ValueError("masking needs 0 <= sample_probability <= 1 and 0 <= min_ratio <= max_ratio < 1")
        return self


class LoaderConfig(Strict):
    sampling: Literal["shuffle", "resample"] = "shuffle"  # training streams never end
    shuffle_buffer: int = 512
    num_workers: int = 0
