"""DINOv3 multi-crop augmentation with Gram-teacher crops.

The recipe of the DINOv3 paper (arXiv 2508.10104) as the official code applies it
(`DataAugmentationDINO` in facebookresearch/dinov3, `dinov3/data/augmentations.py`): two global and
n local random-resized crops with flips, colour jitter, grayscale, blur and (second global crop)
solarize, and optional Gram-teacher crops that share the global crops' geometry.

Every random decision is drawn first, from `random.Random(seed)` only, into an `AugmentParams`
record (`MultiCropAugment.params`); the record is then applied to the image. The same
(image, seed) therefore gives the same crops in any process or DataLoader worker, and the record
makes the sampled decisions testable without image statistics.

Crops are processed as PIL images (fast) and converted to normalised tensors at the end. Blur is
PIL's `ImageFilter.GaussianBlur` (faster than torchvision's: bench/augment_speed.py, docs/data.md),
with σ mapped to the standard deviation of the recipe's truncated 9x9 kernel so the two agree.
"""

from __future__ import annotations

import math
import operator
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from gramline.data.config import CropsConfig
from gramline.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RATIO = (3 / 4, 4 / 3)
BLUR_SIGMA = (0.1, 2.0)
BLUR_KERNEL = 9
SOLARIZE_THRESHOLD = 128
# (global 1, global 2, locals): intended recipe, and what the official code applies (its
# GaussianBlur wrapper in dinov3/data/transforms.py passes 1-p to RandomApply).
BLUR_P = {"intended": (1.0, 0.1, 0.5), "official": (0.0, 0.9, 0.5)}

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


@dataclass
class CropSet:
    global_crops: list[torch.Tensor]  # 2 x [3, G, G]
    local_crops: list[torch.Tensor]  # n_local x [3, L, L]
    gram_crops: list[torch.Tensor] | None  # 2 x [3, Gg, Gg] when crops.gram_size is set
    global_boxes: list[Box]
    global_flips: list[bool]
    ops: AugmentParams


def random_resized_crop_box(
    rng: random.Random, width: int, height: int, scale: Sequence[float], ratio: Sequence[float] = RATIO
) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params`, drawing from `rng`; returns (left, top, w, h)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, w, h
    in_ratio = width / height  # fallback: the central crop at the nearest allowed aspect ratio
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def effective_blur_sigma(sigma: float, kernel_size: int = BLUR_KERNEL) -> float:
    """Standard deviation of the discrete Gaussian kernel of `kernel_size` taps and width `sigma`.

    torchvision truncates the Gaussian to 9x9, which narrows it for large σ (σ=2 → 1.85); PIL's
    blur has unbounded support, so it gets this σ to blur the same amount."""
    half = kernel_size // 2
    x = np.arange(-half, half + 1, dtype=np.float64)
    k = np.exp(-(x**2) / (2 * sigma * sigma))
    return float(math.sqrt((k * x * x).sum() / k.sum()))


def pil_gaussian_blur(img: Image.Image, sigma: float, scale: float = 1.0) -> Image.Image:
    """The recipe's 9x9 blur of width `sigma`, as it looks on an image `scale` times larger."""
    return img.filter(ImageFilter.GaussianBlur(effective_blur_sigma(sigma) * scale))


def checked_rgb(image: Image.Image) -> Image.Image:
    """The augmentation's input, checked to be a PIL image of at least 1x1 pixels, in RGB (Pillow's
    plain conversion; gramline.data.validate converts source images at curation)."""
    if not isinstance(image, Image.Image):
        raise InputError("image", f"is a {type(image).__name__}", "a PIL.Image.Image")
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError("image", f"is {width}x{height} pixels", "at least 1x1 pixels")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise InputError("image", f"mode {image.mode!r} cannot be converted to RGB ({err})",
                         "an RGB-convertible image") from err


class MultiCropAugment:
    """2 global + n local crops (+ Gram-teacher crops) per image, as `DataAugmentationDINO` makes them."""

    def __init__(self, crops: CropsConfig, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.crops = crops
        self.blur_p = BLUR_P[crops.blur_mode]
        mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        # (x/255 - mean)/std as one multiply-subtract
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = mean_t / std_t
        # the size every global box is cropped at, so global and Gram crops share geometry
        self._crop_size = max(crops.global_size, crops.gram_size or 0)

    # ------------------------------------------------------------------ parameter sampling

    def params(self, size: tuple[int, int], seed: int) -> AugmentParams:
        """All random decisions for an image of `size` = (width, height) and `seed`."""
        rng = random.Random(operator.index(seed))
        width, height = size
        c = self.crops
        global_ops = (
            self._sample_crop(rng, width, height, c.global_scale, self.blur_p[0], 0.0),
            self._sample_crop(rng, width, height, c.global_scale, self.blur_p[1], c.solarize_p),
        )
        local_ops = tuple(self._sample_crop(rng, width, height, c.local_scale, self.blur_p[2], 0.0)
                          for _ in range(c.n_local))
        return AugmentParams((width, height), global_ops, local_ops)

    def _sample_crop(self, rng: random.Random, width: int, height: int, scale: Sequence[float],
                     blur_p: float, solarize_p: float) -> CropOps:
        c = self.crops
        left, top, w, h = random_resized_crop_box(rng, width, height, scale)
        flip = c.horizontal_flip and rng.random() < 0.5
        jitter = None
        if rng.random() < c.color_jitter_p:
            order = list(range(4))
            rng.shuffle(order)
            b, ct, s, hue = c.color_jitter
            jitter = ColorJitterOps(tuple(order), rng.uniform(1 - b, 1 + b), rng.uniform(1 - ct, 1 + ct),
                                    rng.uniform(1 - s, 1 + s), rng.uniform(-hue, hue))
        grayscale = rng.random() < c.grayscale_p
        blur_sigma = rng.uniform(*BLUR_SIGMA) if rng.random() < blur_p else None
        solarize = rng.random() < solarize_p
        return CropOps((float(left), float(top), float(left + w), float(top + h)), flip, jitter,
                       grayscale, blur_sigma, solarize)

    # ------------------------------------------------------------------ application

    def __call__(self, image: Image.Image, seed: int) -> CropSet:
        image = checked_rgb(image)
        ops = self.params(image.size, seed)
        c = self.crops
        global_crops, gram_crops = [], []
        for op in ops.global_ops:
            base = self._geometry(image, op, self._crop_size)
            g = base if self._crop_size == c.global_size else base.resize((c.global_size,) * 2, Image.Resampling.BICUBIC)
            global_crops.append(self._to_tensor(self._photometric(g, op, 1.0)))
            if c.gram_size is not None:
                gram = base if self._crop_size == c.gram_size else base.resize((c.gram_size,) * 2, Image.Resampling.BICUBIC)
                if not c.gram_no_distortions:
                    gram = self._photometric(gram, op, c.gram_size / c.global_size)
                gram_crops.append(self._to_tensor(gram))
        local_crops = [self._to_tensor(self._photometric(self._geometry(image, op, c.local_size), op, 1.0))
                       for op in ops.local_ops]
        return CropSet(
            global_crops=global_crops,
            local_crops=local_crops,
            gram_crops=gram_crops if c.gram_size is not None else None,
            global_boxes=[op.box for op in ops.global_ops],
            global_flips=[op.flip for op in ops.global_ops],
            ops=ops,
        )

    @staticmethod
    def _geometry(image: Image.Image, op: CropOps, size: int) -> Image.Image:
        out = image.resize((size, size), Image.Resampling.BICUBIC, box=op.box)
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if op.flip else out

    def _photometric(self, img: Image.Image, op: CropOps, blur_scale: float) -> Image.Image:
        """Colour jitter, grayscale, blur, solarize in the recipe's order; `blur_scale` turns σ
        (in global-crop pixels) into this image's pixels, so a larger Gram crop gets the same blur."""
        if op.jitter is not None:
            j = op.jitter
            for fn in j.order:
                if fn == 0:
                    img = TF.adjust_brightness(img, j.brightness)
                elif fn == 1:
                    img = TF.adjust_contrast(img, j.contrast)
                elif fn == 2:
                    img = TF.adjust_saturation(img, j.saturation)
                else:
                    img = TF.adjust_hue(img, j.hue)
        if op.grayscale:
            img = img.convert("L").convert("RGB")
        if op.blur_sigma is not None:
            img = self._blur(img, op.blur_sigma, blur_scale)
        if op.solarize:
            img = ImageOps.solarize(img, SOLARIZE_THRESHOLD)
        return img

    def _blur(self, img: Image.Image, sigma: float, scale: float) -> Image.Image:
        return pil_gaussian_blur(img, sigma, scale)

    def _to_tensor(self, img: Image.Image) -> torch.Tensor:
        t = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
        t = t.to(torch.float32, memory_format=torch.contiguous_format)
        return t.mul_(self._scale).sub_(self._shift)
