"""The DINO model: backbone + separate DINO and iBOT heads, with one forward over all crops.

One forward per step keeps DDP simple (one backward per forward). The same class serves as the
EMA teacher (global crops only, no masks, eval mode).
"""

from __future__ import annotations

from typing import TypedDict

import torch
from torch import Tensor, nn

from gramline.models.backbone import Backbone
from gramline.models.config import BackboneConfig, HeadsConfig
from gramline.models.heads import DinoHead


class DinoOutput(TypedDict, total=False):
    global_cls: Tensor       # [n_g*B, D] post-norm, pre-head
    global_patches: Tensor   # [n_g*B, N, D] post-norm, pre-head
    dino_global: Tensor      # [n_g*B, K]
    dino_local: Tensor       # [n_l*B, K]
    ibot: Tensor             # [M, K_ibot] at the masked positions


class DinoModel(nn.Module):
    def __init__(self, backbone: BackboneConfig, heads: HeadsConfig) -> None:
        super().__init__()
        self.backbone = Backbone(backbone)
        dim = self.backbone.embed_dim
        self.dino_head = DinoHead(dim, heads.dino_hidden, heads.dino_bottleneck, heads.dino_prototypes, heads.nlayers,
                                  heads.last_layer_init_std)
        self.ibot_head = DinoHead(dim, heads.ibot_hidden, heads.ibot_bottleneck, heads.ibot_prototypes, heads.nlayers,
                                  heads.last_layer_init_std)

    def heads(self) -> dict[str, nn.Module]:
        return {"dino_head": self.dino_head, "ibot_head": self.ibot_head}

    def forward(self, global_crops: Tensor, local_crops: Tensor | None = None, masks: Tensor | None = None,
                mask_index: Tensor | None = None) -> DinoOutput:
        crops = [global_crops]
        group_masks: list[Tensor | None] = [masks]
        if local_crops is not None and local_crops.numel():
            crops.append(local_crops)
            group_masks.append(None)
        tokens = self.backbone(crops, group_masks)
        n_global = global_crops.shape[0]
        cls_all = torch.cat([group["cls"] for group in tokens], dim=0)
        dino_logits = self.dino_head(cls_all)
        out: DinoOutput = {
            "global_cls": tokens[0]["cls"],
            "global_patches": tokens[0]["patches"],
            "dino_global": dino_logits[:n_global],
            "dino_local": dino_logits[n_global:],
        }
        if mask_index is not None:
            masked = tokens[0]["patches"].flatten(0, 1).index_select(0, mask_index)
            out["ibot"] = self.ibot_head(masked)
        return out
