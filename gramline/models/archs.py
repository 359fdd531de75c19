"""Named backbone architectures, all built from timm's DINOv3 ViT classes (sizes as in the official
`dinov3/hub/backbones.py`).

`micro`, `tiny` and `small` are the same Eva class as ViT-S/16 with small width, depth and patch, so
CPU runs exercise the real code path (`micro` is the narrow student of the tiny distillation). The
short names (`vits16`, ...) are the `_qkvb` classes a run from scratch uses; the public weights timm
also ships for the classes without a query/value bias, registered under their timm names so that a
run can start from them (`--init-from timm:vit_base_patch16_dinov3`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Arch:
    timm_name: str
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    extra: dict[str, Any] = field(default_factory=dict)

    def timm_kwargs(self, img_size: int) -> dict[str, Any]:
        """Keyword arguments that, with `timm_name`, rebuild this backbone in plain timm."""
        return {
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "img_size": img_size,
            "num_classes": 0,
            "global_pool": "token",
            **self.extra,
        }


ARCHS: dict[str, Arch] = {
    "micro": Arch("vit_small_patch16_dinov3_qkvb", patch_size=8, embed_dim=48, depth=4, num_heads=2),
    "tiny": Arch("vit_small_patch16_dinov3_qkvb", patch_size=8, embed_dim=96, depth=4, num_heads=3),
    "small": Arch("vit_small_patch16_dinov3_qkvb", patch_size=8, embed_dim=192, depth=6, num_heads=3),
    "vits16": Arch("vit_small_patch16_dinov3_qkvb", 16, 384, 12, 6),
    "vitsp16": Arch("vit_small_plus_patch16_dinov3_qkvb", 16, 384, 12, 6),
    "vitb16": Arch("vit_base_patch16_dinov3_qkvb", 16, 768, 12, 12),
    "vitl16": Arch("vit_large_patch16_dinov3_qkvb", 16, 1024, 24, 16),
    "vithp16": Arch("vit_huge_plus_patch16_dinov3_qkvb", 16, 1280, 32, 20),
    "vit7b16": Arch("vit_7b_patch16_dinov3", 16, 4096, 40, 32),
    # the public classes without query/value bias, by their timm names
    "vit_small_patch16_dinov3": Arch("vit_small_patch16_dinov3", 16, 384, 12, 6),
    "vit_small_plus_patch16_dinov3": Arch("vit_small_plus_patch16_dinov3", 16, 384, 12, 6),
    "vit_base_patch16_dinov3": Arch("vit_base_patch16_dinov3", 16, 768, 12, 12),
    "vit_large_patch16_dinov3": Arch("vit_large_patch16_dinov3", 16, 1024, 24, 16),
    "vit_huge_plus_patch16_dinov3": Arch("vit_huge_plus_patch16_dinov3", 16, 1280, 32, 20),
}


def archs_of_timm(name: str) -> list[str]:
    """The registered architectures built from timm model `name` (several share one class)."""
    return [key for key, arch in ARCHS.items() if arch.timm_name == name]
