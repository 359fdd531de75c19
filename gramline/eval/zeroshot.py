"""Zero-shot classification, image-text retrieval and text-queried segmentation for Models that
carry a text tower.

The align stage (LiT / dino.txt) produces such Models. A text-aligned model is anything with
`encode_image`, `encode_text` and `encode_patches` returning embeddings in one space
(`TextAligned`). The benchmark finds it with `text_tower_of(model)`, which raises
`ZeroShotUnavailable` with a reason the report prints when the model has none. Classification is
the CLIP recipe: average the normalised embeddings of the prompt templates per class, then pick the
class whose embedding is most cosine-similar to the image's. Segmentation applies the same class
embeddings (plus a background class) to every patch embedding. The maths below are pure functions
on embeddings; the benchmark does the encoding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from gramline.eval.segprobe import SegResult, confusion_matrix, miou_from_confusion, upsample_bilinear

TEXT_MANIFEST_KEY = "text_tower"  # the Model manifest entry the align stage writes
DEFAULT_TEMPLATES = ("a photo of a {}.", "an image of a {}.", "a picture showing a {}.")
DEFAULT_RECALL_KS = (1, 5)
DEFAULT_BACKGROUND = "background"  # the class name the background is prompted with (mask value 0)


@runtime_checkable
class TextAligned(Protocol):
    def encode_image(self, images: Tensor) -> Tensor:
        """ImageNet-normalised images [B,3,H,W] -> embeddings [B,E]."""

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Strings -> embeddings [len(texts),E] in the image embedding space."""

    def encode_patches(self, images: Tensor) -> Tensor:
        """ImageNet-normalised images [B,3,H,W] -> per-patch embeddings [B,h,w,E] in the text space."""


class ZeroShotUnavailable(Exception):
    """Why zero-shot cannot run for a model (printed as a skip reason, not an error)."""


def text_tower_of(model: Any) -> TextAligned:
    """The text-aligned view of a LoadedModel, or ZeroShotUnavailable saying why there is none."""
    tower = getattr(model, "text_tower", None)
    if tower is not None:
        if not isinstance(tower, TextAligned):
            raise ZeroShotUnavailable(f"{model.name}: its text tower lacks "
                                      "encode_image/encode_text/encode_patches")
        return tower
    manifest = getattr(model, "manifest", None) or {}
    if TEXT_MANIFEST_KEY not in manifest:
        raise ZeroShotUnavailable(f"{model.name}: no text tower (only Models from the align stage have one)")
    try:
        from gramline.models.text import load_aligned
    except ImportError:
        raise ZeroShotUnavailable(f"{model.name}: carries a text tower, but this build has no loader "
                                  "(gramline.models.text.load_aligned)") from None
    return load_aligned(Path(model.spec.target))


# --------------------------------------------------------------------------- classification


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


# --------------------------------------------------------------------------- retrieval


def retrieval_recall(image_emb: Tensor, text_emb: Tensor, captions: Sequence[str],
                     ks: Sequence[int] = DEFAULT_RECALL_KS) -> dict[str, float]:
    """Image->text and text->image recall@k over N image-caption pairs.

    Row i of `image_emb` [N,E] and of `text_emb` [N,E] embed image i and its caption `captions[i]`;
    each image queries the N captions and each caption the N images (cosine similarity). Captions may
    repeat verbatim across images (procedural captions), and identical strings cannot be told apart,
    so a retrieval is a hit when a retrieved item among the top k has the identical caption string as
    the query's own, not only when it is the query's own pair. Keys: `i2t_r<k>`, `t2i_r<k>`.
    """
    n = len(captions)
    if image_emb.shape[0] != n or text_emb.shape[0] != n:
        raise ValueError(f"{image_emb.shape[0]} images and {text_emb.shape[0]} texts for {n} captions")
    ids: dict[str, int] = {}
    caption_id = torch.tensor([ids.setdefault(c, len(ids)) for c in captions])
    same = caption_id[:, None] == caption_id[None, :]  # [query, item]: identical caption strings
    sim = F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T  # [image, text]
    out: dict[str, float] = {}
    for k in ks:
        top = min(k, n)
        i2t = sim.topk(top, dim=1).indices  # per image, the best captions
        t2i = sim.T.topk(top, dim=1).indices  # per caption, the best images
        out[f"i2t_r{k}"] = float(same.gather(1, i2t).any(dim=1).float().mean())
        out[f"t2i_r{k}"] = float(same.gather(1, t2i).any(dim=1).float().mean())
    return out


# --------------------------------------------------------------------------- segmentation


def seg_class_embeddings(tower: TextAligned, class_names: Sequence[str],
                         templates: Sequence[str] = DEFAULT_TEMPLATES, background: str = DEFAULT_BACKGROUND) -> Tensor:
    """[1 + C, E]: background then the classes, in mask order (0 background, class c -> c + 1)."""
    return class_embeddings(tower, [background, *class_names], templates)


def patch_text_similarity(patch_emb: Tensor, text_emb: Tensor) -> Tensor:
    """Cosine similarity [B,T,h,w] of every patch embedding [B,h,w,E] to every text embedding [T,E]."""
    patches, texts = F.normalize(patch_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    return torch.einsum("bhwe,te->bthw", patches, texts)


def text_segment(patch_emb: Tensor, class_emb: Tensor, out_size: tuple[int, int]) -> Tensor:
    """Class index [B,H,W]: argmax over classes of the patch-class similarity maps, upsampled
    bilinearly to `out_size` (the mask resolution) before the argmax."""
    return upsample_bilinear(patch_text_similarity(patch_emb, class_emb), out_size).argmax(dim=1)


def zero_shot_segmentation(batches: Iterable[tuple[Tensor, Tensor]], class_emb: Tensor,
                           num_classes: int | None = None) -> SegResult:
    """mIoU and pixel accuracy over (patch embeddings [B,h,w,E], masks [B,H,W]) batches, from one
    confusion matrix as in the segmentation probe. `num_classes` (default: the rows of `class_emb`)
    may exceed them when masks hold values no class text covers."""
    k = max(num_classes or 0, class_emb.shape[0])
    confusion = torch.zeros(k, k, dtype=torch.long)
    for patch_emb, masks in batches:
        pred = text_segment(patch_emb, class_emb, (masks.shape[-2], masks.shape[-1]))
        confusion += confusion_matrix(pred, masks, k)
    miou, pixel_acc, ious = miou_from_confusion(confusion)
    return SegResult(miou, pixel_acc, ious)


def text_query_maps(patch_emb: Tensor, text_emb: Tensor) -> Tensor:
    """[n,h,w]: the cosine similarity of each image's patches [n,h,w,E] to its own query [n,E]."""
    patches, texts = F.normalize(patch_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    return torch.einsum("nhwe,ne->nhw", patches, texts)
