"""The training backbone: timm's DINOv3 ViT (Eva) plus what SSL training needs (official `dinov3/models/vision_transformer.py`).

Added on top of timm: the iBOT mask token (masked patch embeddings replaced before the prefix
tokens are prepended), the student-only RoPE coordinate rescale (timm gates it on `training`;
like the official code a new factor is drawn for every block and every crop group), a uniform
drop-path rate, and a forward over a list of crop groups of different sizes that returns
`{cls, registers, patches}` after the final norm, with optional activation checkpointing per
block (`full`, or `selective`: matrix-product and attention outputs kept). The wrapped `vit` keeps
timm's key layout, so its state dict is exported as is and loads into plain timm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypedDict

import timm
import torch
from timm.layers import DropPath
from torch import Tensor, nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from gramline.models.archs import ARCHS, Arch
from gramline.models.config import BackboneConfig

Checkpointing = Literal["none", "selective", "full"]
# What selective activation checkpointing keeps from a block's forward (the rest is recomputed in
# backward): the outputs of matrix products, attention and FSDP2's reduce-scatter, as the recipe does.
_SAVED_OPS = frozenset((
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_mm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
))


def _save_policy(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _save_matmuls() -> tuple:
    return create_selective_checkpoint_contexts(_save_policy)


def _uncached_autocast(device: str) -> torch.autocast:
    """The current autocast without its cache of cast weights: selective checkpointing replays a
    block's operations one for one in backward, and a weight cast that the cache saved in the
    forward of the second crop group would be one cast more in its replay."""
    return torch.autocast(device, dtype=torch.get_autocast_dtype(device), enabled=torch.is_autocast_enabled(device),
                          cache_enabled=False)


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
        self.activation_checkpointing: Checkpointing = "none"

    def forward_group(self, images: Tensor, masks: Tensor | None = None) -> Tokens:
        """One crop group's tokens (the teachers' entry point; FSDP2 registers it as a forward)."""
        return self._tokens(images, masks)

    def _tokens(self, images: Tensor, masks: Tensor | None) -> Tokens:
        vit = self.vit
        x = vit.patch_embed(images)  # [B, H, W, D] (dynamic image size)
        batch, grid_h, grid_w, dim = x.shape
        if masks is not None:
            masks = masks.view(batch, grid_h, grid_w, 1)
            x = torch.where(masks, self.mask_token.to(x.dtype).view(1, 1, 1, dim), x)
        x, rope = vit._pos_embed(x)
        x = vit.norm_pre(x)
        redraw = self.training and vit.rope is not None and getattr(vit.rope, "aug_active", False)
        checkpointing = self.activation_checkpointing if torch.is_grad_enabled() else "none"
        for block in vit.blocks:
            if redraw:
                rope = vit.rope.get_embed(shape=(grid_h, grid_w))
            if checkpointing == "none":
                x = block(x, rope=rope)
            elif checkpointing == "full":
                x = checkpoint(block, x, rope=rope, use_reentrant=False)
            else:
                with _uncached_autocast(x.device.type):
                    x = checkpoint(block, x, rope=rope, use_reentrant=False, context_fn=_save_matmuls)
        x = vit.norm(x)
        prefix = self.num_prefix_tokens
        return {"cls": x[:, 0], "registers": x[:, 1:prefix], "patches": x[:, prefix:]}

    def forward(self, crops: Sequence[Tensor], masks: Sequence[Tensor | None] | None = None) -> list[Tokens]:
        masks = list(masks) if masks is not None else [None] * len(crops)
        return [self._tokens(images, group_masks) for images, group_masks in zip(crops, masks)]
