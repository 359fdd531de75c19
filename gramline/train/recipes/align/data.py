"""Captioned training batches for alignment: each rank's shard stream → (image, caption tokens).

Captions are checked before training (`read_captions`, `check_captions`): a train sample without a
caption, or with an empty one, fails the stage (exit 2) naming the sample; captions longer than the
text context are truncated and counted. As in the crop-batch source, every random choice is a pure
function of (seed, rank, sample position), so a resumed run sees the batches an uninterrupted one
would have.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from gramline.data.augment import IMAGENET_MEAN, IMAGENET_STD, checked_rgb, random_resized_crop_box
from gramline.data.reader import DatasetInfo, read_shard
from gramline.errors import InputError
from gramline.models.text import Tokenizer
from gramline.train.data import derive_seed
from gramline.train.distributed import DistEnv
from gramline.train.recipes.align.config import AlignConfig


@dataclass(frozen=True)
class CaptionBatch:
    images: Tensor  # [B, 3, S, S], ImageNet-normalised
    tokens: Tensor  # [B, context] CLIP BPE ids

    def to(self, device: torch.device) -> CaptionBatch:
        return CaptionBatch(self.images.to(device, non_blocking=True), self.tokens.to(device, non_blocking=True))


def read_captions(info: DatasetInfo, split: str = "train") -> dict[str, str | None]:
    """Sample key → caption (None: the sample has none), from index.parquet's caption column, or,
    for datasets written before it existed, from the shards' `<key>.txt` members."""
    index = info.index
    if "caption" in index.column_names:
        rows = index.filter(np.asarray(index.column("split").to_pylist()) == split)
        return dict(zip(rows.column("key").to_pylist(), rows.column("caption").to_pylist()))
    out: dict[str, str | None] = {}
    for url in info.shard_urls(split):
        for _, raw in read_shard(url):
            out[raw["__key__"]] = raw["txt"].decode() if "txt" in raw else None
    return out


def check_captions(captions: Mapping[str, str | None], tokenizer: Tokenizer, where: str) -> int:
    """How many captions are longer than the context (they will be truncated); exit 2 on a missing
    or empty caption, naming the first such sample."""
    if not captions:
        raise InputError(where, "has no train samples", "a Dataset whose train split has captioned images")
    truncated = 0
    for key, caption in captions.items():
        if caption is None:
            raise InputError(f"{where} sample {key}", "has no caption (<key>.txt)",
                             "a caption for every train sample (curate keeps a manifest's caption column; "
                             "the procedural world writes them)")
        if not caption.strip():
            raise InputError(f"{where} sample {key}", "has an empty caption", "a non-empty caption")
        truncated += not tokenizer.fits(caption)
    return truncated


def shuffled_captions(captions: Mapping[str, str | None], seed: int) -> dict[str, str]:
    """The control: every key gets the caption of the next key on one seeded random cycle through
    all keys, so no image keeps its own caption and every caption is used once."""
    keys = sorted(captions)
    cycle = [keys[i] for i in np.random.default_rng(derive_seed(seed, 17)).permutation(len(keys))]
    return {key: str(captions[cycle[(k + 1) % len(cycle)]]) for k, key in enumerate(cycle)}


def _normalise(image: Image.Image) -> Tensor:
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


@dataclass
class CaptionSample:
    """Stream transform: sample dict → (position, image tensor, caption tokens [context])."""

    size: int
    augment: bool
    crop_scale: tuple[float, float]
    seed: int
    rank: int
    tokenizer: Tokenizer
    replacement: Mapping[str, str] | None = None  # the shuffled-caption control

    def __call__(self, sample: dict) -> tuple[int, Tensor, Tensor]:
        position = int(sample["index"])
        image = checked_rgb(sample["image"])
        caption = self.replacement[sample["key"]] if self.replacement is not None else sample["caption"]
        if caption is None:  # checked before training; a shard changed underneath
            raise InputError(f"sample {sample['key']}", "has no caption (<key>.txt)", "a caption for every sample")
        if self.augment:
            rng = random.Random(derive_seed(self.seed, self.rank, position))
            left, top, w, h = random_resized_crop_box(rng, image.width, image.height, self.crop_scale)
            out = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
            if rng.random() < 0.5:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            out = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return position, _normalise(out), self.tokenizer([caption])[0]


def collate(items: list[tuple[int, Tensor, Tensor]]) -> CaptionBatch:
    return CaptionBatch(torch.stack([image for _, image, _ in items]), torch.stack([tok for _, _, tok in items]))


def caption_batches(info: DatasetInfo, config: AlignConfig, env: DistEnv, size: int, tokenizer: Tokenizer,
                    replacement: Mapping[str, str] | None = None) -> Callable[[int], Iterator[CaptionBatch]]:
    """`batches(start_step)`: this rank's CaptionBatches of `train.batch_size` pairs from that step on."""
    batch_size, seed = config.train.batch_size, config.train.seed
    transform = CaptionSample(size, config.images.augment, config.images.crop_scale, seed, env.rank, tokenizer,
                              replacement)

    def batches(start_step: int) -> Iterator[CaptionBatch]:
        stream = info.stream("train", seed=seed, mode=config.data.sampling, rank=env.rank,
                             world_size=env.world_size, shuffle_buffer=config.data.shuffle_buffer,
                             batch_size=batch_size, start_position=start_step * batch_size, transform=transform)
        workers = config.data.num_workers
        loader = DataLoader(stream, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                            pin_memory=env.device.type == "cuda", prefetch_factor=4 if workers else None,
                            generator=torch.Generator().manual_seed(derive_seed(seed, env.rank, start_step)))
        return iter(loader)

    return batches
