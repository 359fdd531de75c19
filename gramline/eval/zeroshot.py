"""Zero-shot classification from class-name prompts, for Models that carry a text tower.

The align stage (LiT / dino.txt) produces such Models; until it exists this module defines the
interface the benchmark calls. A text-aligned model is anything with `encode_image` and
`encode_text` returning embeddings in one space (`TextAligned`). The benchmark finds it with
`text_tower_of(model)`, which raises `ZeroShotUnavailable` with a reason the report prints when the
model has none. Classification is the CLIP recipe: average the normalised embeddings of the prompt
templates per class, then pick the class whose embedding is most cosine-similar to the image's.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

TEXT_MANIFEST_KEY = "text_tower"  # the Model manifest entry the align stage writes
TEXT_LOADER = "gramline.models.text:load_text_aligned"  # (model_dir, manifest) -> TextAligned
DEFAULT_TEMPLATES = ("a photo of a {}.", "an image of a {}.", "a picture showing a {}.")


@runtime_checkable
class TextAligned(Protocol):
    def encode_image(self, images: Tensor) -> Tensor:
        """ImageNet-normalised images [B,3,H,W] -> embeddings [B,E]."""

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Strings -> embeddings [len(texts),E] in the image embedding space."""


class ZeroShotUnavailable(Exception):
    """Why zero-shot cannot run for a model (printed as a skip reason, not an error)."""


def text_tower_of(model: Any) -> TextAligned:
    """The text-aligned view of a LoadedModel, or ZeroShotUnavailable saying why there is none."""
    tower = getattr(model, "text_tower", None)
    if tower is not None:
        if not isinstance(tower, TextAligned):
            raise ZeroShotUnavailable(f"{model.name}: its text tower lacks encode_image/encode_text")
        return tower
    manifest = getattr(model, "manifest", None) or {}
    if TEXT_MANIFEST_KEY not in manifest:
        raise ZeroShotUnavailable(f"{model.name}: no text tower (only Models from the align stage have one)")
    module_name, _, attr = TEXT_LOADER.partition(":")
    try:
        loader = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        raise ZeroShotUnavailable(f"{model.name}: carries a text tower, but this build has no loader "
                                  f"({TEXT_LOADER})") from None
    return loader(Path(model.spec.target), manifest)


@torch.inference_mode()
def class_embeddings(tower: TextAligned, class_names: Sequence[str],
                     templates: Sequence[str] = DEFAULT_TEMPLATES) -> Tensor:
    """[C, E]: per class, the renormalised mean of its normalised prompt embeddings."""
    rows = []
    for name in class_names:
        emb = F.normalize(tower.encode_text([t.format(name) for t in templates]).float(), dim=-1)
        rows.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(rows)


@torch.inference_mode()
def zero_shot_predict(tower: TextAligned, images: Tensor, class_names: Sequence[str],
                      templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 64) -> Tensor:
    """Class index per image (images already preprocessed for the model)."""
    text = class_embeddings(tower, class_names, templates)
    preds = []
    for lo in range(0, images.shape[0], batch_size):
        img = F.normalize(tower.encode_image(images[lo:lo + batch_size]).float(), dim=-1)
        preds.append((img @ text.T).argmax(dim=1))
    return torch.cat(preds)


def zero_shot_accuracy(tower: TextAligned, images: Tensor, labels: Tensor, class_names: Sequence[str],
                       templates: Sequence[str] = DEFAULT_TEMPLATES) -> float:
    preds = zero_shot_predict(tower, images, class_names, templates)
    return float((preds == labels.long()).float().mean())
