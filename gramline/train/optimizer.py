"""The optimizer part: AdamW over parameter groups whose LR and weight decay a recipe sets each step.

Each group carries `lr_mult`, `wd_mult`, `is_last_layer` and possibly `is_backbone`
(gramline.train.param_groups); a step's `OptimizerValues` give the base LR and weight decay, the
factor on the prototype layers (0 while they are frozen) and on the backbone (0 while new heads warm
up on a loaded backbone: AdamW with LR 0 leaves a parameter exactly as it is). Gradients are clipped
per module (DINOv3 clips the backbone and each head separately), by the norm over all shards under
FSDP2. Its state dict is the full (unsharded) optimizer state, the same for DDP and FSDP2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class OptimizerValues:
    lr: float
    weight_decay: float
    last_layer_lr_factor: float = 1.0
    backbone_lr_factor: float = 1.0


class ScheduledAdamW:
    def __init__(self, model: nn.Module, groups: Sequence[dict[str, Any]], betas: Sequence[float],
                 clip_grad: float, clip_modules: Mapping[str, nn.Module], device: torch.device) -> None:
        """`model` owns every parameter of `groups` (its state dict keys name the optimizer state);
        `clip_modules` are clipped one by one to `clip_grad` (<= 0: no clipping)."""
        self.model = model
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(list(groups), lr=0.0, betas=(float(betas[0]), float(betas[1])),
                                           fused=fused, foreach=None if fused else True)
        self.clip_grad = clip_grad
        self.clip_modules = dict(clip_modules)

    def set_values(self, values: OptimizerValues) -> None:
        for group in self.optimizer.param_groups:
            factor = values.last_layer_lr_factor if group["is_last_layer"] else 1.0
            if group.get("is_backbone"):
                factor *= values.backbone_lr_factor
            group["lr"] = values.lr * group["lr_mult"] * factor
            group["weight_decay"] = values.weight_decay * group["wd_mult"]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def clip_gradients(self) -> None:
        if self.clip_grad <= 0:
            return
        for module in self.clip_modules.values():
            params = [p for p in module.parameters() if p.grad is not None]
            if params:
                norm = nn.utils.get_total_norm([p.grad for p in params])
                if isinstance(norm, DTensor):  # FSDP2: the norm of this rank's shards -> the total over all
                    norm = norm.full_tensor()
                nn.utils.clip_grads_with_norm_(params, self.clip_grad, norm)

    def step(self) -> None:
        self.clip_gradients()
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))
