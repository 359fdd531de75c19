"""Deferred photometrics: the batch finished by `CropBatch.to(device)` (gramline/data/photometric_batch.py)
against the crops finished on the CPU, per seed, on CPU tensors.

Tolerance: at most 3 grey levels on any value and a mean under 0.1 level. The batch ops reproduce
the CPU ops' integer rounding; what is left is the blur (OpenCV's fixed-point kernel against a
float convolution: a 1-level rounding difference on a few % of values), carried through by solarize.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gramline.data import photometric as P
from gramline.data import photometric_batch as B
from gramline.data.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugment
from gramline.data.collate import collate_crops
from gramline.data.config import CropsConfig, MaskingConfig
from gramline.data.reader import open_dataset
from gramline.data.synthetic import write_synthetic_dataset
from gramline.train.data import batch_source
from gramline.train.distributed import DistEnv
from gramline.train.recipes.dino.config import load_pretrain_config

STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def textured(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    low = (rng.random((height // 6 + 1, width // 6 + 1, 3)) * 255).astype(np.uint8)
    return Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC)


def assert_levels_close(a: torch.Tensor, b: torch.Tensor) -> None:
    d = ((a - b) * STD * 255).abs()
    assert d.max() <= 3 and d.mean() < 0.1, (float(d.max()), float(d.mean()))


@pytest.mark.parametrize("gram_no_distortions", [True, False])
def test_device_path_matches_the_cpu_path_per_seed(gram_no_distortions: bool) -> None:
    crops = CropsConfig(global_size=64, local_size=32, n_local=4, gram_size=128, gram_no_distortions=gram_no_distortions,
                        color_jitter_p=0.9, grayscale_p=0.3, solarize_p=0.5)
    cpu, deferred = MultiCropAugment(crops), MultiCropAugment(crops, defer_photometrics=True)
    images = [textured(300, 200, seed=i) for i in range(8)]
    on_cpu = [cpu(im, seed=10 + i) for i, im in enumerate(images)]
    pending = [deferred(im, seed=10 + i) for i, im in enumerate(images)]
    assert all(a.ops == b.ops for a, b in zip(on_cpu, pending, strict=True))
    assert pending[0].global_crops[0].dtype == torch.uint8 and pending[0].pending is not None
    batch = collate_crops(pending, 16, MaskingConfig(), seed=1)
    assert batch.deferred is not None and batch.global_crops.dtype == torch.uint8
    finished = batch.to("cpu")
    reference = collate_crops(on_cpu, 16, MaskingConfig(), seed=1)
    assert finished.deferred is None and finished.global_crops.dtype == torch.float32
    assert torch.equal(finished.masks, reference.masks)
    for name in ("global_crops", "local_crops", "gram_crops"):
        assert_levels_close(getattr(finished, name), getattr(reference, name))


@pytest.mark.parametrize("sigma", [0.3, 1.1, 2.0])
def test_each_batch_op_reproduces_the_cpu_op(sigma: float) -> None:
    img = np.asarray(textured(48, 48, seed=3))
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float()

    def same(ours: np.ndarray, batch: torch.Tensor, max_levels: int = 0) -> None:
        assert np.abs(ours.astype(np.float64) - batch[0].permute(1, 2, 0).numpy()).max() <= max_levels

    f = torch.tensor([1.27])
    same(P.adjust_brightness(img, 1.27), B.adjust_brightness(x, f))
    same(P.adjust_contrast(img, 1.27), B.adjust_contrast(x, f))
    same(P.adjust_saturation(img, 0.83), B.adjust_saturation(x, torch.tensor([0.83])), 1)
    for hue in (-0.09, 0.04):
        same(P.adjust_hue(img, hue), B.adjust_hue(x, torch.tensor([float(P.hue_steps(hue))])))
    same(P.to_grayscale(img), B.to_grayscale(x))
    same(P.gaussian_blur(img, sigma), B.gaussian_blur(x, torch.tensor([sigma])), 1)
    same(P.gaussian_blur(img, sigma, 2.0), B.gaussian_blur(x, torch.tensor([sigma]), 2.0), 1)
    same(P.solarize(img), B.solarize(x))


def test_normalisation_of_a_deferred_constant_image() -> None:
    crops = CropsConfig(global_size=32, local_size=16, n_local=2, color_jitter_p=0.0, grayscale_p=0.0, solarize_p=0.0)
    aug = MultiCropAugment(crops, defer_photometrics=True)
    batch = collate_crops([aug(Image.new("RGB", (60, 40), (255, 128, 0)), seed=0)], 8, MaskingConfig(), 0).to("cpu")
    expected = (torch.tensor([255, 128, 0]).view(1, 3, 1, 1) / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / STD
    torch.testing.assert_close(batch.local_crops, expected.expand_as(batch.local_crops), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("mode", "device", "deferred"), [
    ("auto", "cpu", False), ("auto", "cuda", True), ("device", "cpu", True), ("cpu", "cuda", False)])
def test_where_the_photometrics_run(mode: str, device: str, deferred: bool) -> None:
    aug = MultiCropAugment(CropsConfig(photometrics=mode))  # type: ignore[arg-type]
    assert aug.on_device(torch.device(device)).defer_photometrics is deferred


def test_training_batches_with_device_photometrics(tmp_path: Path) -> None:
    """The training batch source defers the photometrics when configured, and the batches it gives
    finish, on the device, as the CPU-finished ones."""
    write_synthetic_dataset(tmp_path / "d", n_train=8, n_eval=2, size=64, seed=0)
    info = open_dataset(tmp_path / "d")
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    batches = {}
    for mode in ("cpu", "device"):
        config = load_pretrain_config("tiny", overrides=["train.batch_size=4", f"crops.photometrics={mode}"])
        batches[mode] = next(batch_source(info, config, env)(0))
    assert batches["cpu"].deferred is None and batches["device"].deferred is not None
    finished = batches["device"].to(env.device)
    for name in ("global_crops", "local_crops"):
        assert_levels_close(getattr(finished, name), getattr(batches["cpu"], name))
