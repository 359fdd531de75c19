"""Dense-quality diagnostics that need no labels (the benchmark reports them; the anchor stage ranks
checkpoints by them).

- Patch correspondence: view A is the whole image, view B a crop (known pixel box) resized to the
  same side and flipped horizontally. Each patch of B has one geometrically matching patch of A:
  the one that contains B's patch centre mapped back through the flip and the crop. The score is
  the fraction of B's patches whose cosine nearest neighbour among A's patches is that patch.
- Gram similarity: per image, the Gram matrix of L2-normalised patch features (the quantity the
  Gram-anchoring loss matches). `gram_mse` is the Gram loss between a model and a reference;
  `gram_corr` the Pearson correlation of the off-diagonal Gram entries (1 = same patch geometry).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gramline.eval.features import forward_tokens, patch_size_of, preprocess


@dataclass(frozen=True)
class Box:
    x0: int
    y0: int
    width: int
    height: int


def random_boxes(n: int, height: int, width: int, fraction: float, seed: int) -> list[Box]:
    """Crops covering `fraction` of each side, at seeded positions."""
    rng = np.random.default_rng(seed)
    w = max(1, round(width * fraction))
    h = max(1, round(height * fraction))
    return [Box(int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h) for _ in range(n)]


def matching_patches(box: Box, height: int, width: int, grid: int, flipped: bool = True) -> Tensor:
    """For each patch of the (flipped) crop view, row-major, the row-major index of the patch of the
    full-image view that contains its centre."""
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid  # in [0, 1] of the view
    cols_b = (1.0 - centres) if flipped else centres
    x = box.x0 + cols_b * box.width  # original-image pixel coordinates (continuous)
    y = box.y0 + centres * box.height
    col_a = (x / width * grid).floor().long().clamp(0, grid - 1)
    row_a = (y / height * grid).floor().long().clamp(0, grid - 1)
    return (row_a[:, None] * grid + col_a[None, :]).reshape(-1)


def nearest_neighbour_hits(patches_b: Tensor, patches_a: Tensor, target: Tensor) -> Tensor:
    """patches [N_b, D], [N_a, D]; bool [N_b]: the cosine nearest neighbour in A is target."""
    sims = F.normalize(patches_b.float(), dim=-1) @ F.normalize(patches_a.float(), dim=-1).T
    return sims.argmax(dim=1) == target


@torch.inference_mode()
def patch_correspondence(module: nn.Module, images: Tensor, size: int, crop_fraction: float = 0.6, seed: int = 0,
                         batch_size: int = 64, boxes: Sequence[Box] | None = None) -> float:
    """Fraction (0..1) of crop-view patches whose nearest neighbour in the full view matches geometrically.

    images: uint8 [N,3,H,W]. The model sees both views at size x size (a multiple of its patch).
    Crop boxes are seeded (`crop_fraction` of each side) unless given.
    """
    n, _, height, width = images.shape
    patch = patch_size_of(module)
    grid = size // patch
    if boxes is None:
        boxes = random_boxes(n, height, width, crop_fraction, seed)
    hits = total = 0
    for lo in range(0, n, batch_size):
        batch = images[lo:lo + batch_size]
        batch_boxes = boxes[lo:lo + batch_size]
        crops = torch.cat([preprocess(img[None, :, b.y0:b.y0 + b.height, b.x0:b.x0 + b.width], size)
                           for img, b in zip(batch, batch_boxes)])
        _, feats_a = forward_tokens(module, preprocess(batch, size))
        _, feats_b = forward_tokens(module, crops.flip(-1))
        for fa, fb, box in zip(feats_a, feats_b, batch_boxes):
            target = matching_patches(box, height, width, grid)
            ok = nearest_neighbour_hits(fb.reshape(grid * grid, -1), fa.reshape(grid * grid, -1), target)
            hits += int(ok.sum())
            total += ok.numel()
    return hits / max(total, 1)


def dense_patches(module: nn.Module, images: Tensor, size: int, batch_size: int = 64) -> Tensor:
    """Last-layer patch features [N,h,w,D] (float) of uint8 images [N,3,H,W] seen at size x size."""
    return torch.cat([forward_tokens(module, preprocess(images[lo:lo + batch_size], size))[1]
                      for lo in range(0, images.shape[0], batch_size)]).float()


@torch.inference_mode()
def dense_quality(module: nn.Module, images: Tensor, size: int, reference: nn.Module | None = None,
                  reference_size: int | None = None, crop_fraction: float | Sequence[float] = 0.6, seed: int = 0,
                  batch_size: int = 64, reference_patches: Tensor | None = None) -> dict[str, float]:
    """The label-free dense scores of `module` on `images` seen at `size` (how the anchor stage
    ranks checkpoints).

    `corr_top1`: patch correspondence; given several crop fractions, their mean, with each one's
    score also under `corr_top1_crop<fraction>`. `gram_corr` and `gram_mse`: Gram similarity to a
    reference, given as a model (`reference`, seen at `reference_size`, default `size`) or as its
    patch features on the same images (`reference_patches`, e.g. from `dense_patches`).
    """
    if reference is not None and reference_patches is not None:
        raise ValueError("give reference or reference_patches, not both")
    if isinstance(crop_fraction, (int, float)):
        fractions, several = [crop_fraction], False
    else:
        fractions, several = list(crop_fraction), True
    corr = [patch_correspondence(module, images, size, fraction, seed, batch_size) for fraction in fractions]
    scores = {"corr_top1": sum(corr) / len(corr)}
    if several:
        scores.update({f"corr_top1_crop{fraction}": value for fraction, value in zip(fractions, corr)})
    if reference is not None:
        reference_patches = dense_patches(reference, images, reference_size or size, batch_size)
    if reference_patches is not None:
        scores.update(gram_similarity(dense_patches(module, images, size, batch_size), reference_patches))
    return scores


def resize_patch_grid(patches: Tensor, grid: tuple[int, int]) -> Tensor:
    """[N,h,w,D] -> [N,grid,D] by bilinear interpolation (how the Gram loss matches resolutions)."""
    if tuple(patches.shape[1:3]) == tuple(grid):
        return patches
    x = F.interpolate(patches.permute(0, 3, 1, 2).float(), size=grid, mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1)


def gram_matrices(patches: Tensor) -> Tensor:
    """[N,h,w,D] -> [N, hw, hw] Gram matrices of L2-normalised patch features."""
    x = F.normalize(patches.reshape(patches.shape[0], -1, patches.shape[-1]).float(), dim=-1)
    return x @ x.transpose(1, 2)


def gram_similarity(patches: Tensor, reference: Tensor) -> dict[str, float]:
    """Compare two models' patch geometry on the same images (embedding widths may differ)."""
    reference = resize_patch_grid(reference, (patches.shape[1], patches.shape[2]))
    g = gram_matrices(patches)
    r = gram_matrices(reference)
    mse = float((g - r).pow(2).mean())
    off = ~torch.eye(g.shape[1], dtype=torch.bool)
    gv = g[:, off]
    rv = r[:, off]
    gv = gv - gv.mean(dim=1, keepdim=True)
    rv = rv - rv.mean(dim=1, keepdim=True)
    corr = (gv * rv).sum(1) / (gv.norm(dim=1) * rv.norm(dim=1)).clamp(min=1e-12)
    return {"gram_corr": float(corr.mean()), "gram_mse": mse}
