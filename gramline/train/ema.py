"""EMA teacher update θ_t ← m·θ_t + (1−m)·θ_s over all parameters (buffers are not averaged)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_ema(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise RuntimeError("teacher and student have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


@torch.no_grad()
def copy_weights(target: nn.Module, source: nn.Module) -> None:
    for t, s in zip(target.parameters(), source.parameters()):
        t.copy_(s.detach())
