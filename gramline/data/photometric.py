"""The recipe's photometric ops on one uint8 RGB crop (H x W x 3 numpy array), on the CPU.

Each op computes what the torchvision/PIL op of the recipe computes, including PIL's uint8
truncation after every colour-jitter step, but in one OpenCV or lookup-table pass on the array:
no PIL round trips and no per-op image objects. Brightness, contrast and solarize are lookup tables
and give PIL's values exactly; saturation is PIL's blend with the grey image; hue is a rotation in
OpenCV's 8-bit HSV (hue rounded to 1/256 of the circle; PIL's truncated to 1/255: both are about
as far from the exact rotation); the blur is the recipe's 9x9 Gaussian itself (PIL's blur
approximated it). The tolerances against the PIL ops are in tests/test_augment_photometric.py.
`gramline/data/photometric_batch.py` computes the same on a batch of tensors (on the GPU).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from gramline.data.params import CropOps

BLUR_KERNEL = 9  # taps of the recipe's Gaussian blur at the global crop size
SOLARIZE_THRESHOLD = 128
# added before OpenCV's round-to-nearest so that it truncates like PIL's blend: x - 0.499 rounds
# to floor(x) for every fractional part below 0.999
_TRUNCATE = -0.499

cv2.setNumThreads(1)  # one crop is small; DataLoader workers give the parallelism

_SOLARIZE_LUT = np.where(np.arange(256) < SOLARIZE_THRESHOLD, np.arange(256), 255 - np.arange(256)).astype(np.uint8)


def _blend_lut(factor: float, base: float) -> np.ndarray:
    """PIL's `Image.blend(constant base, image, factor)` as a table: float32 math, clipped, truncated."""
    v = np.arange(256, dtype=np.float32)
    out = np.float32(base) + np.float32(factor) * (v - np.float32(base))
    return np.clip(out, 0, 255).astype(np.uint8)


def grey(img: np.ndarray) -> np.ndarray:
    """Luma (0.299 R + 0.587 G + 0.114 B, rounded), H x W."""
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


def adjust_brightness(img: np.ndarray, factor: float) -> np.ndarray:
    return cv2.LUT(img, _blend_lut(factor, 0.0))


def adjust_contrast(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend towards the mean grey level (rounded to an integer, as PIL does)."""
    mean = int(cv2.mean(grey(img))[0] + 0.5)
    return cv2.LUT(img, _blend_lut(factor, mean))


def adjust_saturation(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend towards each pixel's grey level."""
    g = cv2.cvtColor(grey(img), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(img, factor, g, 1.0 - factor, _TRUNCATE)


def hue_steps(hue: float) -> int:
    """A hue shift of `hue` turns as a shift of the 8-bit hue channel (256 steps per turn)."""
    return round(hue * 256) % 256


def shifted_hue(steps: int) -> np.ndarray:
    """Hue after the shift, as a table over OpenCV's 8-bit hue: RGB → HSV_FULL writes 256 steps per
    turn, HSV_FULL → RGB reads 255, so the table also rescales (rounded, half to even)."""
    return np.round((np.arange(256) + steps) % 256 * (255 / 256))


def adjust_hue(img: np.ndarray, hue: float) -> np.ndarray:
    lut = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)  # [256, 1, 3]: S, V kept
    lut[:, 0, 0] = shifted_hue(hue_steps(hue))
    hsv = cv2.LUT(cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL), lut)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def to_grayscale(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(grey(img), cv2.COLOR_GRAY2RGB)


def blur_taps(scale: float) -> int:
    """Taps of the recipe's 9-tap kernel on an image `scale` times the global crop size (odd)."""
    return 2 * math.ceil(BLUR_KERNEL // 2 * scale) + 1


def gaussian_blur(img: np.ndarray, sigma: float, scale: float = 1.0) -> np.ndarray:
    """The recipe's 9x9 Gaussian of width `sigma` (torchvision's kernel and reflect padding), as it
    looks on an image `scale` times larger: `scale` times the taps and the width."""
    k = blur_taps(scale)
    return cv2.GaussianBlur(img, (k, k), sigmaX=sigma * scale, sigmaY=sigma * scale,
                            borderType=cv2.BORDER_REFLECT_101)


def solarize(img: np.ndarray) -> np.ndarray:
    return cv2.LUT(img, _SOLARIZE_LUT)


def apply_photometric(img: np.ndarray, op: CropOps, blur_scale: float = 1.0) -> np.ndarray:
    """Colour jitter (in the op's order), grayscale, blur and solarize as `op` records them;
    `blur_scale` turns σ (in global-crop pixels) into this crop's pixels."""
    if op.jitter is not None:
        j = op.jitter
        for fn in j.order:
            if fn == 0:
                img = adjust_brightness(img, j.brightness)
            elif fn == 1:
                img = adjust_contrast(img, j.contrast)
            elif fn == 2:
                img = adjust_saturation(img, j.saturation)
            else:
                img = adjust_hue(img, j.hue)
    if op.grayscale:
        img = to_grayscale(img)
    if op.blur_sigma is not None:
        img = gaussian_blur(img, op.blur_sigma, blur_scale)
    if op.solarize:
        img = solarize(img)
    return img
