"""The photometric ops of `gramline/data/photometric.py` on a batch of crops, in torch, on any device.

The CPU decodes, crops and resizes to uint8; this finishes a batch where it is trained (the GPU):
colour jitter, grayscale, blur, solarize and normalisation, batched over crops, each crop with its
own recorded parameters (`BatchOps`, built from the `CropOps` of the images). Values stay whole
numbers in 0..255 between ops, rounded or truncated as the uint8 CPU ops do (hue and saturation
with OpenCV's fixed-point integers), so both paths give the same crops for the same seed up to
one-level rounding differences of the blur on a few % of values (tests/test_augment_batch.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from gramline.data.params import CropOps
from gramline.data.photometric import SOLARIZE_THRESHOLD, blur_taps, hue_steps


@dataclass
class BatchOps:
    """Per-crop photometric parameters of N crops (rows), as tensors."""

    order: torch.Tensor  # [N, 4] long: the jitter's op order; -1 where the crop has no jitter
    brightness: torch.Tensor  # [N] float
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue_steps: torch.Tensor  # [N] float: hue shift in 1/256 of the circle
    grayscale: torch.Tensor  # [N] bool
    blur_sigma: torch.Tensor  # [N] float; 0 = no blur
    solarize: torch.Tensor  # [N] bool

    @classmethod
    def of(cls, ops: Sequence[CropOps]) -> BatchOps:
        """The rows for `ops`, in their order."""
        jit = [op.jitter for op in ops]
        return cls(
            order=torch.tensor([list(j.order) if j else [-1] * 4 for j in jit], dtype=torch.long).view(-1, 4),
            brightness=torch.tensor([j.brightness if j else 1.0 for j in jit]),
            contrast=torch.tensor([j.contrast if j else 1.0 for j in jit]),
            saturation=torch.tensor([j.saturation if j else 1.0 for j in jit]),
            hue_steps=torch.tensor([float(hue_steps(j.hue)) if j else 0.0 for j in jit]),
            grayscale=torch.tensor([op.grayscale for op in ops], dtype=torch.bool),
            blur_sigma=torch.tensor([op.blur_sigma if op.blur_sigma is not None else 0.0 for op in ops]),
            solarize=torch.tensor([op.solarize for op in ops], dtype=torch.bool),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> BatchOps:
        return replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                                for f in fields(self)})


def _col(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, 1, 1, 1)


def grey(x: torch.Tensor) -> torch.Tensor:
    """Luma with OpenCV's 15-bit fixed-point weights, rounded: [N, 1, H, W] (exact in float32)."""
    r, g, b = x.unbind(1)
    return torch.floor((r * 9798 + g * 19235 + b * 3735 + 16384) / 32768).unsqueeze(1)


def _blend(x: torch.Tensor, base: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's blend of the image over `base` (float32, clipped, truncated)."""
    return (base + factor * (x - base)).clamp_(0, 255).floor_()


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros((), device=x.device), _col(factor))


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = torch.floor(grey(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5)
    return _blend(x, mean, _col(factor))


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _col(factor)
    return torch.round(x * f + grey(x) * (1 - f) - 0.499).clamp_(0, 255)


# OpenCV's 12-bit fixed-point reciprocals of its 8-bit RGB → HSV_FULL conversion, so the hue and
# saturation here are its integers exactly
_HSV_SHIFT = 12
_SDIV = torch.tensor([0] + [round((255 << _HSV_SHIFT) / i) for i in range(1, 256)], dtype=torch.int32)
_HDIV = torch.tensor([0] + [round((256 << _HSV_SHIFT) / (6.0 * i)) for i in range(1, 256)], dtype=torch.int32)


def adjust_hue(x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `steps` of 256 in OpenCV's 8-bit HSV_FULL (photometric.adjust_hue)."""
    r, g, b = x.to(torch.int32).unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV.to(x.device)[v] + half) >> _HSV_SHIFT
    sixths = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (sixths * _HDIV.to(x.device)[diff] + half) >> _HSV_SHIFT
    h = torch.where(h < 0, h + 256, h).clamp_(max=255)
    h = torch.round(torch.remainder(h + steps.view(-1, 1, 1).to(torch.int32), 256) * (255 / 256))
    h6, sat, val = h * 6 / 255, s.to(x.dtype) / 255, v.to(x.dtype)
    out = []
    for n in (5, 3, 1):  # r, g, b: the piecewise-linear HSV → RGB, one channel at a time
        k = torch.remainder(n + h6, 6)
        out.append(val - val * sat * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.round(torch.stack(out, 1)).clamp_(0, 255)


def to_grayscale(x: torch.Tensor) -> torch.Tensor:
    return grey(x).expand_as(x).contiguous()


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The recipe's Gaussian (taps scaled with `scale`), one σ per crop, reflect padding, rounded."""
    n, c, height, width = x.shape
    k = blur_taps(scale)
    taps = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    s = (sigma * scale).clamp(min=1e-6).view(-1, 1)
    kernel = torch.exp(-(taps**2) / (2 * s * s))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*c, k]
    pad = k // 2
    flat = x.reshape(1, n * c, height, width)
    with torch.backends.cudnn.flags(allow_tf32=False):  # full float32: the rounding matches the CPU's
        flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kernel.view(n * c, 1, 1, k), groups=n * c)
        flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), kernel.view(n * c, 1, k, 1), groups=n * c)
    return torch.round(flat.view(n, c, height, width)).clamp_(0, 255)


def solarize(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x < SOLARIZE_THRESHOLD, x, 255 - x)


_JITTER = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _apply_rows(x: torch.Tensor, rows: torch.Tensor, fn, *args) -> None:  # type: ignore[no-untyped-def]
    idx = rows.nonzero().squeeze(1)
    if idx.numel():
        x[idx] = fn(x[idx], *(a[idx] if isinstance(a, torch.Tensor) else a for a in args))


def apply_photometric(crops: torch.Tensor, ops: BatchOps, blur_scale: float = 1.0) -> torch.Tensor:
    """uint8 (or whole-valued float) crops [N, 3, H, W] → float32 crops after the recorded ops."""
    x = crops.to(torch.float32, copy=True)
    params = (ops.brightness, ops.contrast, ops.saturation, ops.hue_steps)
    for position in range(4):
        for fn_index, fn in enumerate(_JITTER):
            _apply_rows(x, ops.order[:, position] == fn_index, fn, params[fn_index])
    _apply_rows(x, ops.grayscale, to_grayscale)
    _apply_rows(x, ops.blur_sigma > 0, lambda t, s: gaussian_blur(t, s, blur_scale), ops.blur_sigma)
    _apply_rows(x, ops.solarize, solarize)
    return x


def normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x / 255 - mean) / std per channel, on float crops [N, 3, H, W]."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    return x.mul_(1.0 / (255.0 * s)).sub_(m / s)


@dataclass
class DeferredOps:
    """A batch's uint8 crops still to finish: the per-row ops of its global, local and Gram crops
    (`gram_ops` None: the Gram crops are only normalised) and the normalisation."""

    global_ops: BatchOps
    local_ops: BatchOps
    gram_ops: BatchOps | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DeferredOps:
        return replace(self, global_ops=self.global_ops.to(device, non_blocking),
                       local_ops=self.local_ops.to(device, non_blocking),
                       gram_ops=self.gram_ops.to(device, non_blocking) if self.gram_ops is not None else None)

    def finish(self, global_crops: torch.Tensor, local_crops: torch.Tensor, gram_crops: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The normalised float32 crops (on the crops' device)."""
        out_global = normalise(apply_photometric(global_crops, self.global_ops), self.mean, self.std)
        out_local = normalise(apply_photometric(local_crops, self.local_ops), self.mean, self.std)
        out_gram = None
        if gram_crops is not None:
            if self.gram_ops is None:
                out_gram = normalise(gram_crops.to(torch.float32), self.mean, self.std)
            else:
                scale = gram_crops.shape[-1] / global_crops.shape[-1]
                out_gram = normalise(apply_photometric(gram_crops, self.gram_ops, scale), self.mean, self.std)
        return out_global, out_local, out_gram
