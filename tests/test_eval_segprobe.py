"""Segmentation probe: mIoU arithmetic by hand, near-perfect on features that encode the class."""

from __future__ import annotations

import pytest
import torch

from gramline.eval.features import torch_threads
from gramline.eval.segprobe import confusion_matrix, miou_from_confusion, seg_probe, upsample_bilinear


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def test_miou_by_hand() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 2]])
    conf = confusion_matrix(pred, target, num_classes=4)
    assert conf.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 3, 0], [0, 0, 0, 0]]
    miou, pixel_acc, ious = miou_from_confusion(conf)
    # class 0: I=1, U=2+2-1=3; class 1: I=2, U=2+3-2=3; class 2: I=3, U=4+3-3=4; class 3 absent -> skipped
    assert ious == pytest.approx({0: 1 / 3, 1: 2 / 3, 2: 3 / 4})
    assert miou == pytest.approx((1 / 3 + 2 / 3 + 3 / 4) / 3)
    assert pixel_acc == pytest.approx(6 / 8)


def patch_world(n: int, grid: int, pixels: int, classes: int, dim: int, informative: bool, seed: int):
    """Class maps in blocks of 2x2 patches (regions, as in real masks); masks are those maps at pixel
    resolution; features carry the class (one-hot, plus noise) when `informative`, else only noise."""
    g = torch.Generator().manual_seed(seed)
    cls_map = torch.randint(0, classes, (n, grid // 2, grid // 2), generator=g)
    cls_map = cls_map.repeat_interleave(2, 1).repeat_interleave(2, 2)
    masks = cls_map.repeat_interleave(pixels, 1).repeat_interleave(pixels, 2).to(torch.uint8)
    feats = 0.5 * torch.randn(n, grid, grid, dim, generator=g)
    if informative:
        feats[..., :classes] += 3.0 * torch.nn.functional.one_hot(cls_map, classes).float()
    return feats, masks


def test_seg_probe_near_perfect_when_patches_encode_the_class() -> None:
    feats, masks = patch_world(48, grid=8, pixels=4, classes=5, dim=24, informative=True, seed=0)
    result = seg_probe(feats[:32], masks[:32], feats[32:], masks[32:], num_classes=5, steps=120, lr=3e-2,
                       batch_size=16, seed=0)
    # the ceiling is 0.99 mIoU: bilinear upsampling of perfect one-hot logits blurs block corners
    assert result.miou >= 0.93
    assert result.pixel_acc >= 0.96
    assert set(result.iou_by_class) == {0, 1, 2, 3, 4}


def test_seg_probe_near_chance_on_uninformative_features() -> None:
    feats, masks = patch_world(48, grid=8, pixels=4, classes=5, dim=24, informative=False, seed=1)
    result = seg_probe(feats[:32], masks[:32], feats[32:], masks[32:], num_classes=5, steps=120, lr=3e-2,
                       batch_size=16, seed=0)
    assert result.miou < 0.3  # chance is about 1/9 per class at 5 balanced classes


def test_seg_probe_upsamples_to_mask_resolution_and_is_deterministic() -> None:
    feats, masks = patch_world(20, grid=4, pixels=8, classes=3, dim=8, informative=True, seed=2)
    a = seg_probe(feats[:12], masks[:12], feats[12:], masks[12:], num_classes=3, steps=60, seed=3)
    b = seg_probe(feats[:12], masks[:12], feats[12:], masks[12:], num_classes=3, steps=60, seed=3)
    assert a == b
    assert a.miou > 0.8


@pytest.mark.parametrize("shape, size", [((2, 3, 8, 8), (64, 64)), ((1, 2, 5, 7), (13, 29)), ((1, 1, 4, 4), (4, 4))])
def test_matmul_upsampling_equals_torch_bilinear(shape, size) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    assert torch.allclose(upsample_bilinear(x, size), expected, atol=1e-5)
