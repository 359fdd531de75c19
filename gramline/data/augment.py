"""DINOv3 multi-crop augmentation with Gram-teacher crops.

The recipe of the DINOv3 paper (arXiv 2508.10104) as the official code applies it
(`DataAugmentationDINO` in facebookresearch/dinov3, `dinov3/data/augmentations.py`): two global and
n local random-resized crops with flips, colour jitter, grayscale, blur and (second global crop)
solarize, and optional Gram-teacher crops that share the global crops' geometry.

Every random decision is drawn first, from `random.Random(seed)` only, into an `AugmentParams`
record (`MultiCropAugment.params`); the record is then applied to the image. The same
(image, seed) therefore gives the same crops in any process or DataLoader worker, and the record
makes the sampled decisions testable without image statistics.

An encoded JPEG is decoded at the largest DCT reduction the crops allow (`gramline/data/decode.py`);
the crops are cut and resized with PIL (bicubic), then the photometric ops run on uint8 arrays
(`gramline/data/photometric.py`) and each crop group becomes one normalised tensor. With deferred
photometrics the crops stay uint8 and the batch finishes them where it is trained
(`gramline/data/photometric_batch.py`, through `CropBatch.to`).
"""

from __future__ import annotations

import math
import operator
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from gramline.data.config import CropsConfig
from gramline.data.decode import draft_for_crops, open_image
from gramline.data.params import AugmentParams, Box, ColorJitterOps, CropOps
from gramline.data.photometric import apply_photometric
from gramline.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RATIO = (3 / 4, 4 / 3)
BLUR_SIGMA = (0.1, 2.0)
# (global 1, global 2, locals): intended recipe, and what the official code applies (its
# GaussianBlur wrapper in dinov3/data/transforms.py passes 1-p to RandomApply).
BLUR_P = {"intended": (1.0, 0.1, 0.5), "official": (0.0, 0.9, 0.5)}


@dataclass(frozen=True)
class Pending:
    """What deferred crops still need: the photometric ops (for the Gram crops only when
    `gram_photometric`) and normalisation."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    gram_photometric: bool


@dataclass
class CropSet:
    global_crops: list[torch.Tensor]  # 2 x [3, G, G]
    local_crops: list[torch.Tensor]  # n_local x [3, L, L]
    gram_crops: list[torch.Tensor] | None  # 2 x [3, Gg, Gg] when crops.gram_size is set
    global_boxes: list[Box]
    global_flips: list[bool]
    ops: AugmentParams
    pending: Pending | None = None  # set when the crops are uint8 and still need photometrics


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


def checked_image(image: object) -> Image.Image:
    """`image` checked to be a PIL image (possibly not decoded yet) of at least 1x1 pixels."""
    if not isinstance(image, Image.Image):
        raise InputError("image", f"is a {type(image).__name__}", "a PIL.Image.Image or encoded image bytes")
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError("image", f"is {width}x{height} pixels", "at least 1x1 pixels")
    return image


def checked_rgb(image: Image.Image) -> Image.Image:
    """The augmentation's input, checked to be a PIL image of at least 1x1 pixels, in RGB (Pillow's
    plain conversion; gramline.data.validate converts source images at curation)."""
    image = checked_image(image)
    try:
        if image.mode == "RGB":
            image.load()  # decodes a lazily opened image here, so a broken one is an InputError
            return image
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise InputError("image", f"mode {image.mode!r} cannot be converted to RGB ({err})",
                         "an RGB-convertible image") from err


class MultiCropAugment:
    """2 global + n local crops (+ Gram-teacher crops) per image, as `DataAugmentationDINO` makes them."""

    def __init__(self, crops: CropsConfig, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, defer_photometrics: bool = False) -> None:
        self.crops = crops
        self.blur_p = BLUR_P[crops.blur_mode]
        self.mean, self.std = tuple(mean), tuple(std)
        self.defer_photometrics = defer_photometrics
        # (x/255 - mean)/std as one multiply-subtract
        self._scale = 1.0 / (255.0 * torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self._shift = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0 * self._scale
        # the size every global box is cropped at, so global and Gram crops share geometry
        self._crop_size = max(crops.global_size, crops.gram_size or 0)

    def on_device(self, device: torch.device) -> MultiCropAugment:
        """This augmentation for training on `device`: photometrics deferred to the batch on the
        device when `crops.photometrics` is "device", or "auto" and the device is CUDA."""
        mode = self.crops.photometrics
        defer = mode == "device" or (mode == "auto" and torch.device(device).type == "cuda")
        if defer == self.defer_photometrics:
            return self
        return MultiCropAugment(self.crops, self.mean, self.std, defer_photometrics=defer)

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

    def __call__(self, image: Image.Image | bytes, seed: int) -> CropSet:
        """The crops of `image` (a PIL image, or encoded bytes: a JPEG is then decoded at reduced
        size when every crop allows it) for `seed`."""
        image = checked_image(open_image(image))
        ops = self.params(image.size, seed)
        c = self.crops
        needs = [(op.box[2] - op.box[0], op.box[3] - op.box[1], self._crop_size) for op in ops.global_ops]
        needs += [(op.box[2] - op.box[0], op.box[3] - op.box[1], c.local_size) for op in ops.local_ops]
        reduction = draft_for_crops(image, needs)
        image = checked_rgb(image)
        global_arrays, gram_arrays = [], []
        for op in ops.global_ops:
            base = self._geometry(image, op, self._crop_size, reduction)
            g = base if self._crop_size == c.global_size else base.resize((c.global_size,) * 2, Image.Resampling.BICUBIC)
            global_arrays.append(self._photometric(np.asarray(g), op, 1.0))
            if c.gram_size is not None:
                gram = base if self._crop_size == c.gram_size else base.resize((c.gram_size,) * 2, Image.Resampling.BICUBIC)
                gram_array = np.asarray(gram)
                if not c.gram_no_distortions:
                    gram_array = self._photometric(gram_array, op, c.gram_size / c.global_size)
                gram_arrays.append(gram_array)
        local_arrays = [self._photometric(np.asarray(self._geometry(image, op, c.local_size, reduction)), op, 1.0)
                        for op in ops.local_ops]
        return CropSet(
            global_crops=self._tensors(global_arrays),
            local_crops=self._tensors(local_arrays),
            gram_crops=self._tensors(gram_arrays) if c.gram_size is not None else None,
            global_boxes=[op.box for op in ops.global_ops],
            global_flips=[op.flip for op in ops.global_ops],
            ops=ops,
            pending=Pending(self.mean, self.std, not c.gram_no_distortions) if self.defer_photometrics else None,
        )

    @staticmethod
    def _geometry(image: Image.Image, op: CropOps, size: int, reduction: int) -> Image.Image:
        left, top, right, bottom = (v / reduction for v in op.box)  # the box in decoded pixels
        out = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, right, bottom))
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if op.flip else out

    def _photometric(self, img: np.ndarray, op: CropOps, blur_scale: float) -> np.ndarray:
        return img if self.defer_photometrics else apply_photometric(img, op, blur_scale)

    def _tensors(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """uint8 H x W x 3 crops of one size → [3, H, W] tensors: uint8 when deferred, else
        normalised float32, converted as one stack."""
        if not arrays:
            return []
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        if self.defer_photometrics:
            return list(x.contiguous().unbind(0))
        x = x.to(torch.float32, memory_format=torch.contiguous_format)
        return list(x.mul_(self._scale).sub_(self._shift).unbind(0))
