"""The training backbone: timm's DINOv3 ViT (Eva) plus what SSL training needs (official `dinov3/models/vision_transformer.py`).

Added on top of timm: the iBOT mask token (masked patch embeddings replaced before the prefix
tokens are prepended), the student-only RoPE coordinate rescale (timm gates it on `training`;
like the official code a new factor is drawn for every block and every crop group), a uniform
drop-path rate, and a forward over a list of crop groups of different sizes that returns
`{cls, registers, patches}` after the final norm. The wrapped `vit` keeps timm's key layout, so
its state dict is exported as is and loads into plain timm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import timm
import torch
from timm.layers import DropPath
from torch import Tensor, nn

from gramline.models.archs import ARCHS, Arch
from gramline.models.config import BackboneConfig


class Tokens(TypedDict):
    cls: Tensor
    registers: Tensor
    patches: Tensor


def timm_spec(config: BackboneConfig) -> tuple[str, dict]:
    """(timm model name, kwargs) that rebuild this backbone for inference in plain timm."""
    arch = ARCHS[config.arch]
    return arch.timm_name, arch.timm_kwargs(config.img_size)


def create_vit(arch: Arch, img_size: int, drop_path_rate: float = 0.0, uniform_drop_path: bool = True,
               rope_rescale_coords: float | None = None, layerscale_init: float = 1e-5) -> nn.Module:
    """The timm model; drop-path, RoPE rescale and LayerScale init change training only, not the
    key layout, so `timm_spec` alone rebuilds it for inference."""
    vit = timm.create_model(
        arch.timm_name,
        pretrained=False,
        drop_path_rate=drop_path_rate,
        rope_rescale_coords=rope_rescale_coords,
        init_values=layerscale_init,
        **arch.timm_kwargs(img_size),
    )
    if uniform_drop_path and drop_path_rate > 0:
        # timm ramps the rate linearly over depth (block 0 gets none); the recipe uses one rate
        for block in vit.blocks:
            for name in ("drop_path1", "drop_path2"):
                if hasattr(block, name):
                    setattr(block, name, DropPath(drop_path_rate))
    return vit


class Backbone(nn.Module):
    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.arch = ARCHS[config.arch]
        self.vit = create_vit(self.arch, config.img_size, config.drop_path_rate, config.drop_path_uniform,
                              config.rope_rescale_coords, config.layerscale_init)
        self.embed_dim: int = self.vit.embed_dim
        self.patch_size: int = self.arch.patch_size
        self.num_prefix_tokens: int = self.vit.num_prefix_tokens
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))

    def forward_group(self, images: Tensor, masks: Tensor | None = None) -> Tokens:
        vit = self.vit
        x = vit.patch_embed(images)  # [B, H, W, D] (dynamic image size)
        batch, grid_h, grid_w, dim = x.shape
        if masks is not None:
            masks = masks.view(batch, grid_h, grid_w, 1)
            x = torch.where(masks, self.mask_token.to(x.dtype).view(1, 1, 1, dim), x)
        x, rope = vit._pos_embed(x)
        x = vit.norm_pre(x)
        redraw = self.training and vit.rope is not None and getattr(vit.rope, "aug_active", False)
        for block in vit.blocks:
            if redraw:
                rope = vit.rope.get_embed(shape=(grid_h, grid_w))
            if vit.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, rope=rope, use_reentrant=False)
            else:
                x = block(x, rope=rope)
        x = vit.norm(x)
        prefix = self.num_prefix_tokens
        return {"cls": x[:, 0], "registers": x[:, 1:prefix], "patches": x[:, prefix:]}

    def forward(self, crops: Sequence[Tensor], masks: Sequence[Tensor | None] | None = None) -> list[Tokens]:
        masks = list(masks) if masks is not None else [None] * len(crops)
        return [self.forward_group(images, group_masks) for images, group_masks in zip(crops, masks)]
