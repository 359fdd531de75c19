"""Linear segmentation probe on frozen patch features, after the linear ADE20k protocol of the DINOv3
paper (arXiv 2508.10104); the official head, `dinov3/eval/segmentation/models/heads/linear_head.py`,
normalises with a LayerNorm where this one uses BatchNorm.

BatchNorm + a 1x1 convolution map the last layer's patch grid to class logits; the logits are
upsampled bilinearly to the mask resolution and trained with cross-entropy (AdamW, cosine decay).
mIoU is computed over the whole held-out set from one confusion matrix, averaged over the classes
that occur in its ground truth or predictions (the usual mmseg definition: absent classes are NaN
and skipped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def linear_upsample_matrix(size_in: int, size_out: int) -> Tensor:
    """[size_out, size_in]: 1-D linear interpolation exactly as F.interpolate(align_corners=False)."""
    eye = torch.eye(size_in).unsqueeze(1)  # [size_in, 1, size_in]: each basis vector as a signal
    return F.interpolate(eye, size=size_out, mode="linear", align_corners=False).squeeze(1).T


def upsample_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling [B,C,h,w] -> [B,C,H,W] as two small matmuls (bilinear is separable).

    Same values as F.interpolate(mode="bilinear", align_corners=False), but its backward is a matmul
    instead of a scatter, much faster on CPU, where the probe spends most of its time.
    """
    rows = linear_upsample_matrix(x.shape[-2], size[0]).to(x)
    cols = linear_upsample_matrix(x.shape[-1], size[1]).to(x)
    return rows @ x @ cols.T


class LinearSegHead(nn.Module):
    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.classifier = nn.Conv2d(dim, num_classes, kernel_size=1)

    def forward(self, patches: Tensor, out_size: tuple[int, int]) -> Tensor:
        """patches [B,h,w,D] -> logits [B,C,H,W] at the mask resolution."""
        x = patches.permute(0, 3, 1, 2).contiguous()
        return upsample_bilinear(self.classifier(self.norm(x)), out_size)


@dataclass
class SegResult:
    miou: float
    pixel_acc: float
    iou_by_class: dict[int, float]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """[C, C] counts, rows = ground truth, columns = prediction."""
    index = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def miou_from_confusion(confusion: Tensor) -> tuple[float, float, dict[int, float]]:
    confusion = confusion.double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    ious = {int(c): float(intersection[c] / union[c]) for c in torch.nonzero(present).flatten()}
    miou = float(sum(ious.values()) / len(ious)) if ious else 0.0
    pixel_acc = float(intersection.sum() / confusion.sum().clamp(min=1))
    return miou, pixel_acc, ious


def train_seg_head(patches: Tensor, masks: Tensor, num_classes: int, steps: int = 300, lr: float = 1e-2,
                   weight_decay: float = 1e-3, batch_size: int = 32, seed: int = 0) -> LinearSegHead:
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        head = LinearSegHead(patches.shape[-1], num_classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))),
    )
    n = patches.shape[0]
    batch_size = min(batch_size, n)
    out_size = (masks.shape[-2], masks.shape[-1])
    masks = masks.long()
    head.train()
    with torch.enable_grad():
        order = torch.randperm(n, generator=generator)
        cursor = 0
        for _step in range(steps):
            if cursor + batch_size > n:
                order, cursor = torch.randperm(n, generator=generator), 0
            idx = order[cursor:cursor + batch_size]
            cursor += batch_size
            loss = F.cross_entropy(head(patches[idx], out_size), masks[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return head.eval()


@torch.no_grad()
def predict_masks(head: LinearSegHead, patches: Tensor, out_size: tuple[int, int], batch_size: int = 64) -> Tensor:
    head.eval()
    parts = [head(patches[lo:lo + batch_size], out_size).argmax(dim=1) for lo in range(0, patches.shape[0], batch_size)]
    return torch.cat(parts)


def seg_probe(train_patches: Tensor, train_masks: Tensor, test_patches: Tensor, test_masks: Tensor,
              num_classes: int, steps: int = 300, lr: float = 1e-2, weight_decay: float = 1e-3,
              batch_size: int = 32, seed: int = 0) -> SegResult:
    """Train on (patches, masks), report mIoU on the held-out pair. Mask values are 0..num_classes-1."""
    head = train_seg_head(train_patches, train_masks, num_classes, steps, lr, weight_decay, batch_size, seed)
    pred = predict_masks(head, test_patches, (test_masks.shape[-2], test_masks.shape[-1]))
    miou, pixel_acc, ious = miou_from_confusion(confusion_matrix(pred, test_masks, num_classes))
    return SegResult(miou, pixel_acc, ious)
