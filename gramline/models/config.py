"""Config sections of the models: the backbone and the DINO/iBOT heads."""

from __future__ import annotations

from gramline.config import Strict


class BackboneConfig(Strict):
    arch: str = "tiny"  # a name of gramline.models.archs.ARCHS
    img_size: int = 64
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = True  # one rate for every block, as in DINOv3 (timm ramps it over depth)
    rope_rescale_coords: float | None = 2.0  # student-only RoPE coordinate rescale in [1/r, r]
    layerscale_init: float = 1e-5


class HeadsConfig(Strict):
    dino_hidden: int = 2048
    dino_bottleneck: int = 256
    dino_prototypes: int = 65536
    ibot_hidden: int = 2048
    ibot_bottleneck: int = 256
    ibot_prototypes: int = 65536
    nlayers: int = 3
    # trunc-normal std of the prototype layer (DINOv3: 0.02; it has no weight norm, so a larger std
    # gives short runs a usable logit scale from step 0)
    last_layer_init_std: float = 0.02


class VisionHeadConfig(Strict):
    """The trainable vision side of text alignment (official `dinov3/eval/text/vision_tower.py`,
    `dinov3_vitl_text.yaml`): transformer blocks on the frozen backbone's last-layer tokens."""

    blocks: int = 2
    head_dim: int = 64  # attention heads = backbone width / head_dim
    mlp_ratio: float = 4.0  # SwiGLU hidden = 2/3 of width x mlp_ratio, rounded up to a multiple of 64
    layerscale_init: float = 1e-5
    drop_path_rate: float = 0.3


class TextTowerConfig(Strict):
    """The causal text transformer trained from scratch (dino.txt: 24 layers, width 1280, 20 heads,
    context 77, the CLIP BPE vocabulary)."""

    width: int = 1280
    layers: int = 24
    heads: int = 20
    mlp_ratio: float = 4.0
    context_length: int = 77
