"""DINO / iBOT projection heads (official `dinov3/layers/dino_head.py`): 3-layer MLP with GELU, L2-normalised bottleneck,
then a bias-free prototype layer without weight norm (unlike DINOv2)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class DinoHead(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, num_prototypes: int, nlayers: int = 3,
                 last_layer_init_std: float = 0.02):
        super().__init__()
        if nlayers < 1:
            raise ValueError("nlayers must be >= 1")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, num_prototypes, bias=False)
        self.apply(self._init)
        nn.init.trunc_normal_(self.last_layer.weight, std=last_layer_init_std)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def bottleneck(self, x: Tensor) -> Tensor:
        return F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(self.bottleneck(x))
