"""Gram anchoring loss on patch features (DINOv3 paper §4; official `dinov3/loss/gram_loss.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gramline.errors import InputError


def _gram(features: Tensor, img_level: bool) -> Tensor:
    if img_level:
        return features @ features.transpose(-1, -2)  # [B, N, N]
    flat = features.flatten(0, 1)  # [B*N, D]
    return flat @ flat.t()


def gram_loss(
    student_patches: Tensor,
    teacher_patches: Tensor,
    normalize: bool = True,
    img_level: bool = True,
    remove_neg: bool = False,
    remove_only_teacher_neg: bool = False,
) -> Tensor:
    """MSE between the student's and the (constant) teacher's patch Gram matrices, in fp32.

    Patches are [B, N, D]; with `normalize` each token is L2-normalised first. `img_level` builds
    one N×N Gram matrix per image; otherwise one (B·N)×(B·N) matrix over all tokens of the batch.
    `remove_neg` zeroes each matrix's negative entries; `remove_only_teacher_neg` zeroes both
    matrices where the teacher's entry is negative. The mean runs over all entries.
    """
    if remove_neg and remove_only_teacher_neg:
        raise InputError("gram remove_neg / remove_only_teacher_neg", "are both set", "at most one of them")
    if student_patches.ndim != 3 or student_patches.shape != teacher_patches.shape:
        raise ValueError(
            "gram_loss needs student and teacher patches of the same shape [B, N, D], got "
            f"{tuple(student_patches.shape)} and {tuple(teacher_patches.shape)}"
        )
    with torch.autocast(device_type=student_patches.device.type, enabled=False):
        student = student_patches.float()
        teacher = teacher_patches.detach().float()
        if normalize:
            student = F.normalize(student, p=2, dim=-1)
            teacher = F.normalize(teacher, p=2, dim=-1)
        g_student = _gram(student, img_level)
        g_teacher = _gram(teacher, img_level)
        if remove_neg:
            g_student = g_student.clamp_min(0.0)
            g_teacher = g_teacher.clamp_min(0.0)
        elif remove_only_teacher_neg:
            teacher_neg = g_teacher < 0
            g_student = g_student.masked_fill(teacher_neg, 0.0)
            g_teacher = g_teacher.masked_fill(teacher_neg, 0.0)
        return F.mse_loss(g_student, g_teacher)
