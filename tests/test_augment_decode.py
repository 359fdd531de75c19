"""Decoding only what the crops need (gramline/data/decode.py): JPEG bytes are decoded at the largest
DCT reduction the crops allow, with the same crop geometry as from the fully decoded image."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from gramline.data.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugment
from gramline.data.config import CropsConfig
from gramline.data.decode import draft_for_crops, largest_reduction, open_image
from gramline.errors import InputError

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
SMALL = CropsConfig(global_size=64, local_size=32, n_local=4, color_jitter_p=0.0, grayscale_p=0.0, solarize_p=0.0,
                    blur_mode="official")


def encoded(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, quality=95) if fmt == "JPEG" else image.save(buf, fmt)
    return buf.getvalue()


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    low = (rng.random((height // 50 + 2, width // 50 + 2, 3)) * 255).astype(np.uint8)
    return Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC)


def ramp(width: int, height: int) -> Image.Image:
    """R encodes x, G encodes y (pixel centres, linear), B constant."""
    x = np.broadcast_to(np.arange(width)[None, :], (height, width)) * 255 / (width - 1)
    y = np.broadcast_to(np.arange(height)[:, None], (height, width)) * 255 / (height - 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8))


def grey_levels(t: torch.Tensor) -> torch.Tensor:
    return (t * STD + MEAN) * 255


def test_reduction_keeps_every_crop_at_least_its_output_size() -> None:
    rng = random.Random(0)
    for _ in range(300):
        crops = [(rng.uniform(10, 3000), rng.uniform(10, 3000), rng.choice([32, 96, 224])) for _ in range(rng.randint(1, 6))]
        r = largest_reduction(crops)
        assert r in (1, 2, 4, 8)
        if r > 1:
            assert all(min(w, h) / r >= size for w, h, size in crops)
        if r < 8:  # the next reduction would shrink some crop below its output size
            assert any(min(w, h) / (2 * r) < size for w, h, size in crops)


def test_draft_decodes_a_jpeg_smaller_and_leaves_other_images_alone() -> None:
    data = encoded(photo(800, 600))
    image = open_image(data)
    assert draft_for_crops(image, [(400, 300, 64)]) == 4
    image.load()
    assert image.size == (200, 150)
    png = open_image(encoded(photo(800, 600), "PNG"))
    assert draft_for_crops(png, [(400, 300, 64)]) == 1 and png.size == (800, 600)
    decoded = Image.open(io.BytesIO(data))
    decoded.load()
    assert draft_for_crops(decoded, [(400, 300, 64)]) == 1 and decoded.size == (800, 600)


def test_same_boxes_and_geometry_from_jpeg_bytes() -> None:
    width, height = 1600, 1200
    data = encoded(ramp(width, height))
    aug = MultiCropAugment(SMALL)
    reductions = set()
    for seed in range(6):
        from_bytes, from_image = aug(data, seed), aug(Image.open(io.BytesIO(data)).convert("RGB"), seed)
        assert from_bytes.ops == from_image.ops  # the same boxes, in original-image pixels
        needs = [(op.box[2] - op.box[0], op.box[3] - op.box[1], 64) for op in from_bytes.ops.global_ops]
        reductions.add(largest_reduction(needs + [(op.box[2] - op.box[0], op.box[3] - op.box[1], 32)
                                                 for op in from_bytes.ops.local_ops]))
        for k, op in enumerate(from_bytes.ops.global_ops):
            raw = grey_levels(from_bytes.global_crops[k]).double()
            left, top, right, bottom = op.box
            u = torch.arange(64, dtype=torch.float64)
            xs = left + ((63 - u if op.flip else u) + 0.5) * (right - left) / 64 - 0.5
            ys = top + (u + 0.5) * (bottom - top) / 64 - 0.5
            inner = slice(4, -4)
            # the crop shows the recorded box: R follows x, G follows y (a blur off: official mode, crop 1)
            if op.blur_sigma is None:
                assert (raw[0] - xs * 255 / (width - 1))[inner, inner].abs().max() < 3.0, (seed, k)
                assert (raw[1] - (ys * 255 / (height - 1))[:, None])[inner, inner].abs().max() < 3.0, (seed, k)
    assert reductions - {1}, "no crop set allowed a reduced decode"


def test_reduced_decode_changes_pixels_little() -> None:
    data = encoded(photo(2000, 1500, seed=1))
    aug = MultiCropAugment(SMALL)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    diffs = []
    for seed in range(4):
        a, b = aug(data, seed), aug(full, seed)
        diffs += [(grey_levels(x) - grey_levels(y)).abs().flatten()
                  for x, y in zip(a.global_crops + a.local_crops, b.global_crops + b.local_crops, strict=True)]
    d = torch.cat(diffs)
    assert d.mean() < 2.0 and torch.quantile(d, 0.99) < 8, (float(d.mean()), float(torch.quantile(d, 0.99)))


@pytest.mark.parametrize("bad", [b"not an image", encoded(photo(64, 48))[:300]])
def test_broken_bytes_raise_input_error(bad: bytes) -> None:
    with pytest.raises(InputError, match="image"):
        MultiCropAugment(SMALL)(bad, seed=0)


def test_training_batches_hand_the_augmentation_encoded_jpegs(tmp_path) -> None:
    """The training stream leaves images encoded, so a large JPEG is decoded only as far as its crops
    need; the batch equals augmenting the shard's bytes, and differs (a little) from augmenting the
    fully decoded image."""
    from gramline.data.reader import open_dataset
    from gramline.data.writer import DatasetWriter, ShardSample
    from gramline.train.data import batch_source
    from gramline.train.distributed import DistEnv
    from gramline.train.recipes.dino.config import load_pretrain_config

    images = [encoded(photo(1600, 1200, seed)) for seed in range(2)]
    with DatasetWriter(tmp_path / "data", stage="test") as writer:
        for i, data in enumerate(images):
            writer.add("train", ShardSample(key=f"train-{i}", image=data, image_ext="jpg"))
        writer.close(classes=[])
    config = load_pretrain_config("tiny", overrides=["train.batch_size=2", "crops.photometrics=cpu"])
    seen: list[object] = []

    class Recording(MultiCropAugment):
        def __call__(self, image, seed):  # type: ignore[no-untyped-def]
            seen.append(image)
            return super().__call__(image, seed)

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    next(batch_source(open_dataset(tmp_path / "data"), config, env, augments=[Recording(config.crops)])(0))
    assert len(seen) == 2 and set(seen) <= set(images)  # the shard's bytes themselves, not decoded images
    augment = MultiCropAugment(config.crops)
    from_bytes, from_pixels = augment(images[0], seed=5), augment(Image.open(io.BytesIO(images[0])).convert("RGB"), seed=5)
    assert from_bytes.global_boxes == from_pixels.global_boxes
    assert not all(torch.equal(a, b) for a, b in zip(from_bytes.global_crops, from_pixels.global_crops))  # 1/8 size here
