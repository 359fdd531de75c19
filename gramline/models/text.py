"""Text-aligned models (LiT / dino.txt, DINOv3 paper §6): a frozen backbone, a trainable vision
head, a text tower trained from scratch, and the shared embedding space they learn.

Vision side (official `dinov3/eval/text/vision_tower.py`): the backbone's last-layer tokens
[CLS, registers, patches] go through a few transformer blocks (timm's `Block` with SwiGLU and
LayerScale; no RoPE) and a final LayerNorm; the image embedding is concat(head CLS, mean of the
head's patch tokens), twice the backbone width, with no projection. Text side: open_clip's causal
`TextTransformer`, pooled at the end-of-text token and linearly projected to that width, over the
CLIP BPE tokenizer that open_clip ships in its wheel (no download).

`load_aligned(model_dir)` gives an `AlignedModel` with `encode_image`, `encode_text` and
`encode_patches`. A patch's embedding is [0, head patch token]: its dot product with a text
embedding reads the text's patch half only, as the official dino.txt segmentation compares patch
tokens with `text_features[:, D:]`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from open_clip.tokenizer import SimpleTokenizer, default_bpe  # type: ignore[import-untyped]
from open_clip.transformer import TextTransformer  # type: ignore[import-untyped]
from safetensors.torch import load_file
from timm.layers import SwiGLU
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from gramline.artifacts import read_manifest
from gramline.errors import InputError
from gramline.models.config import TextTowerConfig, VisionHeadConfig

TEXT_FILE = "text.safetensors"  # the vision head, the text tower and the logit scale
MANIFEST_KEY = "text_tower"
VOCAB_SIZE = 49408  # the CLIP BPE vocabulary


# --------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """open_clip's CLIP BPE tokenizer at a fixed context length; longer texts are truncated (the
    last token stays end-of-text, so pooling still finds it)."""

    def __init__(self, context_length: int) -> None:
        self.context_length = context_length
        self._bpe = SimpleTokenizer(context_length=context_length)

    def __call__(self, texts: Sequence[str]) -> Tensor:
        return self._bpe(list(texts), context_length=self.context_length)

    def fits(self, text: str) -> bool:
        """Whether `text` fits the context with its start and end tokens (else it is truncated)."""
        return len(self._bpe.encode(text)) + 2 <= self.context_length

    def identity(self) -> dict[str, Any]:
        """What a Model records, so that a loader can refuse a different vocabulary."""
        path = Path(default_bpe())
        return {"kind": "open_clip.SimpleTokenizer", "vocab": path.name,
                "vocab_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "vocab_size": VOCAB_SIZE,
                "context_length": self.context_length}


# --------------------------------------------------------------------------- the two towers


def _swiglu(in_features: int, hidden_features: int, bias: bool = True, drop: float = 0.0, **_: Any) -> nn.Module:
    """SwiGLU at 2/3 of the MLP width, aligned to 64 (the official `SwiGLUFFNAligned`)."""
    hidden = 64 * math.ceil(hidden_features * 2 / 3 / 64)
    return SwiGLU(in_features, hidden, bias=bias, drop=drop)


class VisionHead(nn.Module):
    def __init__(self, width: int, num_prefix_tokens: int, config: VisionHeadConfig) -> None:
        super().__init__()
        if width % config.head_dim:
            raise InputError("config field 'head.head_dim'", f"is {config.head_dim}, which does not divide the "
                             f"backbone width {width}", "a divisor of the backbone width (64 in the recipe)")
        self.num_prefix_tokens = num_prefix_tokens
        self.blocks = nn.ModuleList(
            Block(width, width // config.head_dim, config.mlp_ratio, qkv_bias=True, init_values=config.layerscale_init,
                  drop_path=config.drop_path_rate, mlp_layer=_swiglu)  # type: ignore[arg-type]
            for _ in range(config.blocks))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Backbone tokens [B, prefix + N, D] -> (head CLS [B, D], head patch tokens [B, N, D])."""
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        return tokens[:, 0], tokens[:, self.num_prefix_tokens:]


def build_text_tower(config: TextTowerConfig, embed_dim: int) -> TextTransformer:
    if config.width % config.heads:
        raise InputError("config field 'text.heads'", f"is {config.heads}, which does not divide text.width "
                         f"{config.width}", "a divisor of the text width")
    return TextTransformer(context_length=config.context_length, vocab_size=VOCAB_SIZE, width=config.width,
                           heads=config.heads, layers=config.layers, mlp_ratio=config.mlp_ratio,
                           output_dim=embed_dim, pool_type="argmax", proj_bias=False)


class TextAlignment(nn.Module):
    """Everything alignment trains: the vision head, the text tower and the logit scale (ln of the
    inverse temperature; the recipe clamps it to [0, ln 100] after every step)."""

    def __init__(self, width: int, num_prefix_tokens: int, head: VisionHeadConfig, text: TextTowerConfig,
                 init_logit_scale: float = math.log(1 / 0.07)) -> None:
        super().__init__()
        self.head = VisionHead(width, num_prefix_tokens, head)
        self.text = build_text_tower(text, 2 * width)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    @property
    def embed_dim(self) -> int:
        return 2 * self.head.norm.normalized_shape[0]

    def image_embedding(self, backbone_tokens: Tensor) -> Tensor:
        cls, patches = self.head(backbone_tokens)
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)

    def forward(self, backbone_tokens: Tensor, text_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(image embeddings [B, E], text embeddings [T, E]), not normalised."""
        return self.image_embedding(backbone_tokens), self.text(text_tokens)


# --------------------------------------------------------------------------- the aligned model


class AlignedModel(nn.Module):
    """A frozen timm backbone and its text alignment, in eval mode (gramline.eval.zeroshot.TextAligned)."""

    def __init__(self, backbone: nn.Module, alignment: TextAlignment, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.backbone: Any = backbone.eval().requires_grad_(False)  # a timm ViT (untyped attributes)
        self.alignment = alignment.eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.alignment.logit_scale.device

    @torch.inference_mode()
    def backbone_tokens(self, images: Tensor) -> Tensor:
        return self.backbone.forward_features(images.to(self.device))

    @torch.inference_mode()
    def encode_image(self, images: Tensor) -> Tensor:
        """ImageNet-normalised images [B, 3, H, W] -> embeddings [B, E]."""
        return self.alignment.image_embedding(self.backbone_tokens(images))

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Strings -> embeddings [len(texts), E] (truncated to the context length)."""
        return self.alignment.text(self.tokenizer(texts).to(self.device))

    @torch.inference_mode()
    def encode_patches(self, images: Tensor) -> Tensor:
        """Images -> per-patch embeddings [B, h, w, E] in the text space: [0, head patch token]."""
        _, patches = self.alignment.head(self.backbone_tokens(images))
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        patches = patches.reshape(patches.shape[0], h, w, -1)
        return torch.cat([torch.zeros_like(patches), patches], dim=-1)

    @property
    def patch_size(self) -> int:
        return int(self.backbone.patch_embed.patch_size[0])


def alignment_config(manifest: dict[str, Any], flag: str) -> tuple[VisionHeadConfig, TextTowerConfig]:
    entry = manifest.get(MANIFEST_KEY)
    if not isinstance(entry, dict) or "head" not in entry or "text" not in entry:
        raise InputError(f"{flag} manifest field {MANIFEST_KEY!r}", "is missing or malformed",
                         "a Model from the align stage (with head and text configs)")
    return VisionHeadConfig(**entry["head"]), TextTowerConfig(**entry["text"])


def load_aligned(model_dir: Path | str, flag: str = "--model", device: str | torch.device = "cpu") -> AlignedModel:
    """The align stage's Model artifact as an AlignedModel (exit 2 naming the file when it does not load)."""
    from gramline.models.io import load_backbone

    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir, "Model", flag)
    head_config, text_config = alignment_config(manifest, f"{flag} {model_dir}")
    tokenizer = Tokenizer(text_config.context_length)
    recorded = manifest[MANIFEST_KEY].get("tokenizer", {}).get("vocab_sha256")
    if recorded != tokenizer.identity()["vocab_sha256"]:
        raise InputError(f"{model_dir}/manifest.json text_tower.tokenizer", "names another BPE vocabulary than the "
                         "installed open_clip's", "the open_clip_torch version the model was trained with")
    backbone, _ = load_backbone(model_dir, flag)
    vit: Any = backbone
    alignment = TextAlignment(int(vit.embed_dim), int(vit.num_prefix_tokens), head_config, text_config)
    weights = model_dir / TEXT_FILE
    if not weights.is_file():
        raise InputError(f"{flag} {model_dir}", f"has no {TEXT_FILE}", "a Model artifact from the align stage")
    try:
        alignment.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as err:
        raise InputError(str(weights), f"does not match the manifest's head and text configs ({err})") from err
    return AlignedModel(backbone, alignment, tokenizer).to(device)

