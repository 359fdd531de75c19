"""Teachers as parts of a run: the EMA teacher of a student, and a frozen teacher with an optional refresh.

- `EmaTeacher`: θ_t ← m·θ_t + (1−m)·θ_s over all parameters after every optimizer step (buffers
  are not averaged), in eval mode without gradients. DINO's teacher; each distilled student's
  exported copy.
- `FrozenTeacher`: a module that only gives targets: the Gram anchor (DINOv3 paper §4), the
  distillation teacher. With a refresh rule, its weights become a copy of another module's after
  each step the rule names (the official Gram teacher update with momentum 0); the steps done are
  kept in its state.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn


@torch.no_grad()
def update_ema(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise RuntimeError("teacher and student have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The unsharded state dict on CPU (the same for a plain, DDP or FSDP2 module)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True))


def unsharded_copy(module: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """A plain CPU copy of a sharded `module` on rank 0, `build()`'s architecture holding its full
    weights (an empty one on the other ranks). Collective: every rank calls it. Built on the meta
    device, so it neither allocates twice nor draws random numbers."""
    state = full_state_dict(module)
    with torch.device("meta"):
        plain = build()
    if state:
        plain.load_state_dict(state, assign=True)
    return plain


class ModulePart:
    """A module as a checkpoint part (its full state dict)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Tensor]:
        return full_state_dict(self.module)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        load_full_state_dict(self.module, state)


class EmaTeacher(ModulePart):
    def __init__(self, student: nn.Module) -> None:
        super().__init__(copy.deepcopy(student).eval().requires_grad_(False))

    @property
    def model(self) -> nn.Module:
        return self.module

    def update(self, student: nn.Module, momentum: float) -> None:
        update_ema(self.module, student, momentum)


class FrozenTeacher:
    def __init__(self, module: nn.Module, refresh_when: Callable[[int], bool] | None = None) -> None:
        """`refresh_when(step)`: whether to refresh after step `step` (counted from 1); None: never."""
        self.module = module.eval().requires_grad_(False)
        self.refresh_when = refresh_when
        self.refreshes: list[int] = []

    def to(self, device: torch.device) -> FrozenTeacher:
        self.module.to(device)
        return self

    def maybe_refresh(self, step: int, weights: Callable[[], Mapping[str, Tensor]]) -> bool:
        """After step `step`: copy `weights()` in when the rule says so."""
        if self.refresh_when is None or not self.refresh_when(step):
            return False
        with torch.no_grad():
            self.module.load_state_dict(dict(weights()), strict=True)
        self.refreshes.append(step)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"weights": full_state_dict(self.module), "refreshes": list(self.refreshes)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_full_state_dict(self.module, state["weights"])
        self.refreshes = [int(s) for s in state.get("refreshes", [])]
