"""DINO loss on the CLS token (DINOv3 paper §3; official `dinov3/loss/dino_clstoken_loss.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gramline.errors import InputError


def dino_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    student_temp: float = 0.1,
    ignore_diagonal: bool = False,
) -> Tensor:
    """Cross-entropy between teacher targets and student predictions over all crop pairs.

    student_logits [S, B, K] (S student crops), teacher_probs [T, B, K] (T teacher crops, e.g. from
    `sinkhorn_knopp`, treated as constants). Returns the mean over (s, t, b) of
    -Σ_k p_t[k] · log_softmax(s / student_temp)[k], in fp32.

    ignore_diagonal drops the same-view pairs s == t (for the global term, where student and
    teacher see the same crops) and normalises by B · (S·T − min(S, T)).
    """
    if not student_temp > 0:
        raise InputError("dino_loss student_temp", f"is {student_temp}", "a temperature > 0")
    if (
        student_logits.ndim != 3
        or teacher_probs.ndim != 3
        or student_logits.shape[1:] != teacher_probs.shape[1:]
    ):
        raise ValueError(
            f"dino_loss needs student [S, B, K] and teacher [T, B, K] with equal B and K, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
        )
    n_student, batch, _ = student_logits.shape
    n_teacher = teacher_probs.shape[0]
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
        per_pair = -torch.einsum("sbk,tbk->st", log_p, teacher_probs.detach().float())  # [S, T]
        n_pairs = n_student * n_teacher
        if ignore_diagonal:
            diag = min(n_student, n_teacher)
            keep = ~torch.eye(n_student, n_teacher, dtype=torch.bool, device=per_pair.device)
            per_pair = per_pair * keep
            n_pairs -= diag
        if n_pairs == 0 or batch == 0:
            raise ValueError(f"dino_loss has no pairs to average (S={n_student}, T={n_teacher}, B={batch})")
        return per_pair.sum() / (batch * n_pairs)
