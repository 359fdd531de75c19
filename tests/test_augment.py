"""Multi-crop augmentation, Gram-teacher crops and crop batching (official `dinov3/data/augmentations.py`)."""

from __future__ import annotations

import random
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from gramline.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropSet,
    MultiCropAugment,
    random_resized_crop_box,
)
from gramline.data.collate import collate_crops
from gramline.data.config import CropsConfig, MaskingConfig
from gramline.errors import InputError
from gramline.train.recipes.dino.config import load_pretrain_config

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
VIT = {"global_size": 224, "local_size": 96, "n_local": 8}
NO_COLOUR = {"color_jitter_p": 0.0, "grayscale_p": 0.0, "solarize_p": 0.0}


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth random colours: structure at several scales, no two crops alike."""
    rng = np.random.default_rng(seed)
    low = (rng.random((height // 8 + 1, width // 8 + 1, 3)) * 255).astype(np.uint8)
    return Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC)


def gradient_image(width: int = 500, height: int = 375) -> Image.Image:
    """R encodes x, G encodes y (pixel centres, linear), B a 25-px checkerboard."""
    x = np.arange(width)[None, :].repeat(height, 0)
    y = np.arange(height)[:, None].repeat(width, 1)
    checker = ((x // 25 + y // 25) % 2) * 255
    return Image.fromarray(np.stack([x * 255 / (width - 1), y * 255 / (height - 1), checker], -1).round()
                           .astype(np.uint8))


def unnormalise(t: torch.Tensor) -> torch.Tensor:
    return (t * STD + MEAN) * 255


def all_tensors(cs: CropSet) -> list[torch.Tensor]:
    return cs.global_crops + cs.local_crops + (cs.gram_crops or [])


# --------------------------------------------------------------------------- determinism and shapes


def test_same_seed_gives_identical_crops_whatever_the_global_rng_state() -> None:
    aug = MultiCropAugment(load_pretrain_config("tiny", overrides=["crops.gram_size=96"]).crops)
    image = noise_image(64, 64)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    first = aug(image, seed=7)
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    random.random(), np.random.random(), torch.rand(3)
    second = aug(image, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(all_tensors(first), all_tensors(second), strict=True))
    assert first.ops == second.ops
    other = aug(image, seed=8)
    assert not torch.equal(first.global_crops[0], other.global_crops[0])
    assert not torch.equal(first.local_crops[0], other.local_crops[0])
    assert first.ops != other.ops


def test_tiny_preset_shapes_counts_and_normalisation() -> None:
    crops = load_pretrain_config("tiny").crops
    cs = MultiCropAugment(crops)(noise_image(64, 64), seed=0)
    assert [tuple(t.shape) for t in cs.global_crops] == [(3, 48, 48)] * 2
    assert [tuple(t.shape) for t in cs.local_crops] == [(3, 24, 24)] * 4
    assert cs.gram_crops is None
    assert len(cs.global_boxes) == 2 and len(cs.global_flips) == 2
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    for t in all_tensors(cs):
        assert t.dtype == torch.float32 and t.is_contiguous()
        assert bool(((t >= lo - 1e-5) & (t <= hi + 1e-5)).all())


def test_vit_224_96x8_with_gram_crops_shapes() -> None:
    crops = CropsConfig(**VIT, gram_size=448)
    cs = MultiCropAugment(crops)(noise_image(500, 375), seed=3)
    assert [tuple(t.shape) for t in cs.global_crops] == [(3, 224, 224)] * 2
    assert [tuple(t.shape) for t in cs.local_crops] == [(3, 96, 96)] * 8
    assert [tuple(t.shape) for t in cs.gram_crops or []] == [(3, 448, 448)] * 2


def test_normalisation_of_a_constant_image() -> None:
    crops = CropsConfig(**VIT, **NO_COLOUR)
    cs = MultiCropAugment(crops)(Image.new("RGB", (300, 200), (255, 128, 0)), seed=0)
    expected = (torch.tensor([255, 128, 0]).view(3, 1, 1) / 255 - MEAN) / STD
    for t in all_tensors(cs):
        torch.testing.assert_close(t, expected.expand_as(t), atol=1e-5, rtol=0)


def test_grayscale_and_solarize_are_applied_as_recorded() -> None:
    crops = CropsConfig(**VIT, color_jitter_p=0.0, grayscale_p=1.0, solarize_p=1.0)
    cs = MultiCropAugment(crops)(Image.new("RGB", (300, 200), (200, 200, 200)), seed=0)
    assert all(op.grayscale for op in cs.ops.global_ops + cs.ops.local_ops)
    assert [op.solarize for op in cs.ops.global_ops] == [False, True]
    # 200 is above the threshold 128: solarize turns it into 255 - 200 = 55, on global crop 2 only
    torch.testing.assert_close(unnormalise(cs.global_crops[0]), torch.full((3, 224, 224), 200.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(unnormalise(cs.global_crops[1]), torch.full((3, 224, 224), 55.0), atol=1e-3, rtol=0)
    coloured = MultiCropAugment(crops)(noise_image(300, 200), seed=0)
    for t in all_tensors(coloured):
        raw = unnormalise(t)
        torch.testing.assert_close(raw[0], raw[1], atol=1e-3, rtol=0)
        torch.testing.assert_close(raw[1], raw[2], atol=1e-3, rtol=0)


# --------------------------------------------------------------------------- sampled decisions


def rates(crops: CropsConfig, n: int = 400) -> dict[str, float]:
    aug = MultiCropAugment(crops)
    draws = [aug.params((500, 375), seed) for seed in range(n)]
    g1 = [p.global_ops[0] for p in draws]
    g2 = [p.global_ops[1] for p in draws]
    loc = [op for p in draws for op in p.local_ops]
    every = g1 + g2 + loc
    return {
        "blur_g1": np.mean([op.blur_sigma is not None for op in g1]),
        "blur_g2": np.mean([op.blur_sigma is not None for op in g2]),
        "blur_local": np.mean([op.blur_sigma is not None for op in loc]),
        "solarize_g1": np.mean([op.solarize for op in g1]),
        "solarize_g2": np.mean([op.solarize for op in g2]),
        "solarize_local": np.mean([op.solarize for op in loc]),
        "jitter": np.mean([op.jitter is not None for op in every]),
        "gray": np.mean([op.grayscale for op in every]),
        "flip": np.mean([op.flip for op in every]),
    }


@pytest.mark.parametrize(("mode", "g1", "g2", "local"), [("intended", 1.0, 0.1, 0.5), ("official", 0.0, 0.9, 0.5)])
def test_blur_and_photometric_probabilities(mode: str, g1: float, g2: float, local: float) -> None:
    r = rates(CropsConfig(**VIT, blur_mode=mode))
    # 400 draws: binomial sd <= 0.025 per global rate, 0.009 for the 3200 local crops
    assert r["blur_g1"] == g1  # p = 0 or 1 exactly
    assert abs(r["blur_g2"] - g2) < 0.05
    assert abs(r["blur_local"] - local) < 0.04
    assert r["solarize_g1"] == 0 and r["solarize_local"] == 0
    assert abs(r["solarize_g2"] - 0.2) < 0.07
    assert abs(r["jitter"] - 0.8) < 0.03
    assert abs(r["gray"] - 0.2) < 0.03
    assert abs(r["flip"] - 0.5) < 0.03


def test_flip_off_and_probabilities_from_config() -> None:
    r = rates(CropsConfig(**VIT, horizontal_flip=False, color_jitter_p=0.0, grayscale_p=1.0, solarize_p=0.5), n=200)
    assert r["flip"] == 0 and r["jitter"] == 0 and r["gray"] == 1
    assert abs(r["solarize_g2"] - 0.5) < 0.12


def test_sampled_parameter_ranges() -> None:
    aug = MultiCropAugment(CropsConfig(**VIT))
    width, height = 500, 375
    for seed in range(200):
        p = aug.params((width, height), seed)
        for ops, (lo, hi) in ((p.global_ops, (0.32, 1.0)), (p.local_ops, (0.05, 0.32))):
            for op in ops:
                left, top, right, bottom = op.box
                assert 0 <= left < right <= width and 0 <= top < bottom <= height
                w, h = right - left, bottom - top
                # rounding to whole pixels moves area and aspect a little off the sampled values
                assert lo * 0.97 <= w * h / (width * height) <= hi * 1.03
                assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03
                if op.jitter is not None:
                    j = op.jitter
                    assert sorted(j.order) == [0, 1, 2, 3]
                    assert 0.6 <= j.brightness <= 1.4 and 0.6 <= j.contrast <= 1.4
                    assert 0.8 <= j.saturation <= 1.2 and -0.1 <= j.hue <= 0.1
                if op.blur_sigma is not None:
                    assert 0.1 <= op.blur_sigma <= 2.0


def test_random_resized_crop_falls_back_to_a_centred_crop_like_torchvision() -> None:
    # 1000x10: every try needs h >= sqrt(0.32*10000 / (4/3)) = 49 > 10, so all 10 fail; the
    # fallback keeps the full height and the widest allowed aspect: w = round(10 * 4/3) = 13.
    assert random_resized_crop_box(random.Random(0), 1000, 10, (0.32, 1.0)) == ((1000 - 13) // 2, 0, 13, 10)
    assert random_resized_crop_box(random.Random(0), 10, 1000, (0.32, 1.0)) == (0, (1000 - 13) // 2, 10, 13)
    left, top, w, h = random_resized_crop_box(random.Random(0), 1, 1, (0.05, 0.32))
    assert (left, top, w, h) == (0, 0, 1, 1)


def test_local_crops_come_from_the_whole_image_independently() -> None:
    aug = MultiCropAugment(CropsConfig(**VIT))
    boxes = [op.box for seed in range(50) for op in aug.params((500, 375), seed).local_ops]
    assert len(set(boxes)) == len(boxes)
    lefts = [b[0] for b in boxes]
    tops = [b[1] for b in boxes]
    # spread over the full image, not confined to a global crop
    assert min(lefts) < 50 and max(lefts) > 350 and min(tops) < 40 and max(tops) > 250


# --------------------------------------------------------------------------- geometry and Gram crops


def expected_coordinates(box: tuple[float, float, float, float], flip: bool, size: int,
                         width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The R and G values a crop of gradient_image() must have: pixel u's centre maps to source
    x = left + (u + 0.5) * (right - left) / size - 0.5 (PIL's pixel-centre convention)."""
    left, top, right, bottom = box
    u = torch.arange(size, dtype=torch.float64)
    if flip:
        u = size - 1 - u
    xs = left + (u + 0.5) * (right - left) / size - 0.5
    ys = top + (torch.arange(size, dtype=torch.float64) + 0.5) * (bottom - top) / size - 0.5
    return (xs * 255 / (width - 1))[None, :].expand(size, size), (ys * 255 / (height - 1))[:, None].expand(size, size)


@pytest.mark.parametrize("gram_size", [128, 32])
def test_global_and_gram_crops_show_the_recorded_box(gram_size: int) -> None:
    width, height = 500, 375
    image = gradient_image(width, height)
    crops = CropsConfig(global_size=64, local_size=32, n_local=2, gram_size=gram_size, blur_mode="official",
                        **NO_COLOUR)
    aug = MultiCropAugment(crops)
    flips = set()
    for seed in range(6):
        cs = aug(image, seed)
        assert cs.global_boxes == [op.box for op in cs.ops.global_ops]
        for k in range(2):
            flips.add(cs.global_flips[k])
            for tensor, size in ((cs.global_crops[k], 64), (cs.gram_crops[k], gram_size)):  # type: ignore[index]
                raw = unnormalise(tensor).double()
                ex, ey = expected_coordinates(cs.global_boxes[k], cs.global_flips[k], size, width, height)
                m = max(2, size // 16)  # bicubic and blur are exact on a linear ramp away from the borders
                inner = (slice(m, -m), slice(m, -m))
                assert (raw[0] - ex)[inner].abs().max() < 2.5, (seed, k, size)
                assert (raw[1] - ey)[inner].abs().max() < 2.5, (seed, k, size)
    assert flips == {True, False}


def test_gram_crop_downsampled_matches_the_global_crop() -> None:
    image = gradient_image()
    crops = CropsConfig(global_size=64, local_size=32, n_local=2, gram_size=128, blur_mode="official", **NO_COLOUR)
    aug = MultiCropAugment(crops)
    for seed in range(4):
        cs = aug(image, seed)
        assert cs.ops.global_ops[0].blur_sigma is None  # official mode never blurs global crop 1

        def down(t: torch.Tensor) -> torch.Tensor:
            return F.interpolate(t[None], size=64, mode="bicubic", antialias=True)[0]

        same = (down(cs.gram_crops[0]) - cs.global_crops[0]).abs().mean()  # type: ignore[index]
        other = (down(cs.gram_crops[1]) - cs.global_crops[0]).abs().mean()  # type: ignore[index]
        assert same < 0.05 and other > 0.5, (seed, float(same), float(other))


def test_gram_crop_with_distortions_shares_the_photometric_parameters() -> None:
    image = gradient_image()
    base = {"global_size": 64, "local_size": 32, "n_local": 2, "gram_size": 128, "color_jitter_p": 1.0, "grayscale_p": 0.0,
                "solarize_p": 1.0, "blur_mode": "official"}
    distorted = MultiCropAugment(CropsConfig(**base, gram_no_distortions=False))
    clean = MultiCropAugment(CropsConfig(**base, gram_no_distortions=True))
    for seed in range(4):
        a, b = distorted(image, seed), clean(image, seed)
        assert a.ops == b.ops
        for k in range(2):
            torch.testing.assert_close(a.global_crops[k], b.global_crops[k], atol=0, rtol=0)
            down = F.interpolate(a.gram_crops[k][None], size=64, mode="bicubic", antialias=True)[0]  # type: ignore[index]
            undistorted = F.interpolate(b.gram_crops[k][None], size=64, mode="bicubic", antialias=True)[0]  # type: ignore[index]
            assert (down - a.global_crops[k]).abs().mean() < 0.15
            if k == 1:  # global crop 2 is solarized (p = 1): a clean Gram crop would be far off
                assert (undistorted - a.global_crops[k]).abs().mean() > 0.5


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [Image.new("RGB", (0, 0)), Image.new("RGB", (0, 5)), Image.new("L", (7, 0)),
                                 Image.new("La", (4, 4)), np.zeros((8, 8, 3), np.uint8)])
def test_bad_images_raise_input_error(bad: object) -> None:
    aug = MultiCropAugment(load_pretrain_config("tiny").crops)
    with pytest.raises(InputError, match="image"):
        aug(bad, seed=0)  # type: ignore[arg-type]


def test_other_modes_are_converted_to_rgb() -> None:
    aug = MultiCropAugment(load_pretrain_config("tiny").crops)
    for mode in ("L", "P", "RGBA", "CMYK", "I;16", "1"):
        cs = aug(noise_image(40, 30).convert(mode), seed=0)
        assert tuple(cs.global_crops[0].shape) == (3, 48, 48)


# --------------------------------------------------------------------------- collate


def test_collate_is_crop_major_with_masks_for_global_crops() -> None:
    cfg = load_pretrain_config("tiny", overrides=["crops.gram_size=96"])
    aug = MultiCropAugment(cfg.crops)
    items = [aug(noise_image(64, 64, seed=i), seed=i) for i in range(6)]
    batch = collate_crops(items, patch_size=8, masking=cfg.masking, seed=11)
    assert batch.batch_size == 6 and batch.n_global == 2 and batch.n_local == 4
    assert tuple(batch.global_crops.shape) == (12, 3, 48, 48)
    assert tuple(batch.local_crops.shape) == (24, 3, 24, 24)
    assert tuple(batch.gram_crops.shape) == (12, 3, 96, 96)  # type: ignore[union-attr]
    for c in range(2):
        for b in range(6):
            assert torch.equal(batch.global_crops[c * 6 + b], items[b].global_crops[c])
            assert torch.equal(batch.gram_crops[c * 6 + b], items[b].gram_crops[c])  # type: ignore[index]
    for c in range(4):
        for b in range(6):
            assert torch.equal(batch.local_crops[c * 6 + b], items[b].local_crops[c])
    assert batch.masks.dtype == torch.bool and tuple(batch.masks.shape) == (12, 36)  # (48/8)^2 patches
    assert int(batch.masks.any(1).sum()) == 6  # int(12 * 0.5) crops masked
    again = collate_crops(items, patch_size=8, masking=cfg.masking, seed=11)
    assert torch.equal(again.masks, batch.masks)
    assert not torch.equal(collate_crops(items, 8, cfg.masking, seed=12).masks, batch.masks)
    moved = batch.to("cpu")
    assert torch.equal(moved.global_crops, batch.global_crops) and moved.batch_size == 6


def test_collate_without_local_or_gram_crops_and_bad_patch_size() -> None:
    crops = CropsConfig(global_size=32, local_size=16, n_local=0)
    aug = MultiCropAugment(crops)
    items = [aug(noise_image(50, 40, seed=i), seed=i) for i in range(3)]
    batch = collate_crops(items, patch_size=8, masking=MaskingConfig(sample_probability=1.0), seed=0)
    assert batch.local_crops.numel() == 0 and batch.n_local == 0 and batch.gram_crops is None
    assert tuple(batch.masks.shape) == (6, 16) and bool(batch.masks.any(1).all())
    with pytest.raises(InputError, match="patch_size"):
        collate_crops(items, patch_size=7, masking=MaskingConfig(), seed=0)
    with pytest.raises(InputError, match="batch"):
        collate_crops([], patch_size=16, masking=MaskingConfig(), seed=0)


class _Images(Dataset):
    def __init__(self, aug: MultiCropAugment) -> None:
        self.aug = aug

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> CropSet:
        return self.aug(noise_image(64, 64, seed=i), seed=1000 + i)


def test_dataloader_workers_do_not_change_the_batches() -> None:
    cfg = load_pretrain_config("tiny")
    dataset = _Images(MultiCropAugment(cfg.crops))

    def batches(workers: int) -> list:
        loader = DataLoader(dataset, batch_size=4, num_workers=workers,
                            collate_fn=partial(collate_crops, patch_size=8, masking=cfg.masking, seed=5))
        return list(loader)

    for a, b in zip(batches(0), batches(2), strict=True):
        assert torch.equal(a.global_crops, b.global_crops) and torch.equal(a.local_crops, b.local_crops)
        assert torch.equal(a.masks, b.masks)
