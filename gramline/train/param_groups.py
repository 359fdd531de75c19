"""AdamW parameter groups (official `dinov3/train/param_groups.py`): layer-wise LR decay, patch-embed LR multiplier,
weight-decay exclusions, the prototype (`last_layer`) groups that can be frozen early on, and (for a
run that warms up new heads on a loaded backbone) backbone groups kept apart from head groups."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

NO_DECAY_MARKERS = ("norm", "gamma", "fourier_w")


@dataclass(frozen=True)
class GroupKey:
    lr_mult: float
    wd_mult: float
    is_last_layer: bool
    is_backbone: bool = False  # set only when the backbone is to be frozen on its own (head warm-up)


def backbone_layer_id(name: str, depth: int) -> int:
    """0 for patch embed and tokens, i+1 for block i, depth+1 for the final norms."""
    if name.startswith(("vit.patch_embed", "vit.cls_token", "vit.reg_token", "mask_token", "vit.pos_embed")):
        return 0
    if name.startswith("vit.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def lr_multiplier(name: str, depth: int, layerwise_decay: float, patch_embed_lr_mult: float) -> float:
    mult = layerwise_decay ** (depth + 1 - backbone_layer_id(name, depth))
    if name.startswith("vit.patch_embed"):
        mult *= patch_embed_lr_mult
    return mult


def wd_multiplier(name: str) -> float:
    return 0.0 if name.endswith("bias") or any(marker in name for marker in NO_DECAY_MARKERS) else 1.0


def build_param_groups(backbone: nn.Module, heads: dict[str, nn.Module], depth: int, layerwise_decay: float,
                       patch_embed_lr_mult: float, separate_backbone: bool = False) -> list[dict]:
    """Groups with `lr_mult`, `wd_mult`, `is_last_layer` and `is_backbone`; the optimizer part
    (gramline.train.optimizer) sets lr/wd per step. `separate_backbone` never lets a backbone and a
    head parameter share a group (so the backbone alone can get LR 0); without it the groups are the
    recipe's, as checkpoints of earlier runs hold them."""
    grouped: dict[GroupKey, list] = {}

    def add(name: str, param: nn.Parameter, lr_mult: float, in_backbone: bool) -> None:
        if not param.requires_grad:
            return
        key = GroupKey(lr_mult, wd_multiplier(name), "last_layer" in name, in_backbone and separate_backbone)
        grouped.setdefault(key, []).append(param)

    for name, param in backbone.named_parameters():
        add(name, param, lr_multiplier(name, depth, layerwise_decay, patch_embed_lr_mult), True)
    for head_name, head in heads.items():
        for name, param in head.named_parameters():
            add(f"{head_name}.{name}", param, 1.0, False)
    return [
        {"params": params, "lr_mult": key.lr_mult, "wd_mult": key.wd_mult, "is_last_layer": key.is_last_layer,
         "is_backbone": key.is_backbone}
        for key, params in sorted(grouped.items(),
                                  key=lambda kv: (kv[0].lr_mult, kv[0].wd_mult, kv[0].is_last_layer, kv[0].is_backbone))
    ]


def scaled_lr(base_lr: float, rule: str, global_batch: int) -> float:
    """The recipe's LR scaling: sqrt_wrt_1024 is lr × 4 × sqrt(B/1024) (official `dinov3/train/train.py::build_schedulers_v2`)."""
    if rule == "sqrt_wrt_1024":
        return base_lr * 4.0 * (global_batch / 1024) ** 0.5
    if rule == "linear_wrt_256":
        return base_lr * global_batch / 256
    return base_lr
