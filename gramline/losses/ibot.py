"""iBOT masked-patch loss (official `dinov3/loss/ibot_patch_loss.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gramline.errors import InputError


def ibot_mask_weights(masks: Tensor) -> Tensor:
    """Per-masked-patch weights [M] for `ibot_loss` from the crops' masks [C, N] (bool).

    A patch masked in crop c gets 1 / (number of masked patches in crop c), so each masked crop
    contributes the mean over its patches. The order is that of `masks.flatten().nonzero()`, i.e.
    crop-major, the order in which the DINO recipe selects the masked patch tokens.
    """
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be a bool tensor [C, N], got {masks.dtype} {tuple(masks.shape)}")
    counts = masks.sum(dim=1, keepdim=True).clamp_min(1).float()
    return (1.0 / counts).expand(masks.shape)[masks]


def ibot_loss(
    student_patch_logits: Tensor,
    teacher_probs: Tensor,
    weights: Tensor,
    n_crops: int,
    student_temp: float = 0.1,
) -> Tensor:
    """-Σ_j w_j Σ_k p_t[j, k] · log_softmax(s_j / student_temp)[k] / n_crops, in fp32.

    student_patch_logits and teacher_probs are [M, K] over the M masked patches (teacher targets
    treated as constants), weights [M] from `ibot_mask_weights`, and n_crops the number of global
    crops in the batch (n_g · B), masked or not: unmasked crops dilute the loss, as in the recipe.
    """
    if isinstance(n_crops, bool) or not isinstance(n_crops, int) or n_crops < 1:
        raise InputError(
            "ibot_loss n_crops", f"is {n_crops!r}", "an integer >= 1 (global crops in the batch)"
        )
    if not student_temp > 0:
        raise InputError("ibot_loss student_temp", f"is {student_temp}", "a temperature > 0")
    if (
        student_patch_logits.ndim != 2
        or student_patch_logits.shape != teacher_probs.shape
        or weights.shape != student_patch_logits.shape[:1]
    ):
        raise ValueError(
            "ibot_loss needs student [M, K], teacher [M, K] and weights [M], got "
            f"{tuple(student_patch_logits.shape)}, {tuple(teacher_probs.shape)}, {tuple(weights.shape)}"
        )
    with torch.autocast(device_type=student_patch_logits.device.type, enabled=False):
        log_p = F.log_softmax(student_patch_logits.float() / student_temp, dim=-1)
        per_patch = -(teacher_probs.detach().float() * log_p).sum(dim=-1)  # [M]
        return (per_patch * weights.detach().float()).sum() / n_crops
