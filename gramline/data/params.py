"""The record of one image's random augmentation decisions (drawn by `MultiCropAugment.params`)."""

from __future__ import annotations

from dataclasses import dataclass

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ColorJitterOps:
    order: tuple[int, ...]  # permutation of 0..3: brightness, contrast, saturation, hue
    brightness: float
    contrast: float
    saturation: float
    hue: float


@dataclass(frozen=True)
class CropOps:
    """Everything random about one crop."""

    box: Box  # (left, top, right, bottom) in source-image pixels
    flip: bool
    jitter: ColorJitterOps | None
    grayscale: bool
    blur_sigma: float | None  # σ in output-crop pixels; None = no blur
    solarize: bool


@dataclass(frozen=True)
class AugmentParams:
    image_size: tuple[int, int]  # (width, height)
    global_ops: tuple[CropOps, ...]
    local_ops: tuple[CropOps, ...]
