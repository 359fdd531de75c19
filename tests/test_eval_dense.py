"""Label-free dense diagnostics: crop/flip geometry by hand, correspondence on an image whose answer
is known, Gram similarity invariances."""

from __future__ import annotations

import pytest
import timm
import torch

from gramline.eval.dense import (
    Box,
    dense_quality,
    gram_similarity,
    matching_patches,
    patch_correspondence,
    random_boxes,
)
from gramline.eval.features import torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def test_matching_patches_by_hand() -> None:
    # top-left quarter, flipped: B's columns 0,1 show the quarter's right half (A column 1)
    got = matching_patches(Box(0, 0, 32, 32), 64, 64, grid=4, flipped=True).reshape(4, 4)
    assert got.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [5, 5, 4, 4], [5, 5, 4, 4]]
    # the whole image, flipped: a mirror of the columns
    whole = matching_patches(Box(0, 0, 64, 64), 64, 64, grid=4, flipped=True).reshape(4, 4)
    assert whole.tolist() == [[r * 4 + 3 - c for c in range(4)] for r in range(4)]
    # bottom-right quarter, not flipped
    plain = matching_patches(Box(32, 32, 32, 32), 64, 64, grid=4, flipped=False).reshape(4, 4)
    assert plain.tolist() == [[10, 10, 11, 11], [10, 10, 11, 11], [14, 14, 15, 15], [14, 14, 15, 15]]


def test_random_boxes_are_seeded_and_inside() -> None:
    a = random_boxes(20, 48, 64, 0.6, seed=0)
    assert a == random_boxes(20, 48, 64, 0.6, seed=0) and a != random_boxes(20, 48, 64, 0.6, seed=1)
    for box in a:
        assert box.width == 38 and box.height == 29
        assert 0 <= box.x0 <= 64 - 38 and 0 <= box.y0 <= 48 - 29


def colour_cells(n: int, seed: int) -> torch.Tensor:
    """uint8 [n,3,64,64]: a 4x4 board of 16px cells, each a different random colour."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, 256, (n, 3, 4, 4), generator=g, dtype=torch.uint8)
    return cells.repeat_interleave(16, 2).repeat_interleave(16, 3)


def test_correspondence_is_perfect_when_features_are_the_patch_pixels() -> None:
    """A depth-0 timm DINOv3 ViT embeds each patch linearly: with one colour per 16px cell and crops
    aligned to 8px, every crop patch sees exactly its matching cell's colour, so a correct geometry
    gives 1.0 (an unflipped or mis-scaled mapping would hit other cells' colours)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)  # some random inits map two of the 96 colours close together after LayerNorm
        module = timm.create_model("vit_small_patch16_dinov3_qkvb", patch_size=16, embed_dim=32, depth=0,
                                   num_heads=2, img_size=64, num_classes=0, global_pool="token").eval()
    images = colour_cells(6, seed=0)
    boxes = [Box(0, 0, 32, 32), Box(8, 16, 32, 32), Box(32, 32, 32, 32), Box(16, 24, 32, 32), Box(0, 0, 64, 64),
             Box(24, 0, 32, 32)]
    score = patch_correspondence(module, images, size=64, boxes=boxes)
    assert score == pytest.approx(1.0)


def test_correspondence_of_a_random_vit_is_a_fraction() -> None:
    module = timm.create_model("vit_small_patch16_dinov3_qkvb", patch_size=8, embed_dim=96, depth=4, num_heads=3,
                               img_size=64, num_classes=0, global_pool="token").eval()
    images = colour_cells(4, seed=1)
    score = patch_correspondence(module, images, size=64, crop_fraction=0.6, seed=0)
    again = patch_correspondence(module, images, size=64, crop_fraction=0.6, seed=0)
    assert 0.0 <= score <= 1.0 and score == again


def test_gram_similarity_invariances() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 4, 16, generator=g)
    same = gram_similarity(x, x)
    assert same["gram_corr"] == pytest.approx(1.0) and same["gram_mse"] == pytest.approx(0.0, abs=1e-10)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    rotated = gram_similarity(x @ q, x)  # a rotation of feature space keeps every cosine
    assert rotated["gram_corr"] == pytest.approx(1.0, abs=1e-5) and rotated["gram_mse"] < 1e-10
    wider = gram_similarity(x, torch.cat([x, torch.zeros(5, 4, 4, 8)], dim=-1))  # widths may differ
    assert wider["gram_corr"] == pytest.approx(1.0, abs=1e-5)
    unrelated = gram_similarity(x, torch.randn(5, 4, 4, 16, generator=g))
    assert unrelated["gram_corr"] < 0.3 and unrelated["gram_mse"] > 0.02


def test_gram_similarity_resizes_the_reference_grid() -> None:
    x = torch.randn(3, 4, 4, 8, generator=torch.Generator().manual_seed(1))
    fine = x.repeat_interleave(2, 1).repeat_interleave(2, 2)  # the same map at 8x8
    result = gram_similarity(x, fine)  # bilinear 8->4 samples each 2x2 block's centre: exact
    assert result["gram_corr"] == pytest.approx(1.0, abs=1e-5)


def test_dense_quality_against_itself_and_another_model() -> None:
    def vit(seed: int, depth: int = 2):
        torch.manual_seed(seed)
        return timm.create_model("vit_small_patch16_dinov3_qkvb", patch_size=8, embed_dim=48, depth=depth,
                                 num_heads=3, img_size=32, num_classes=0, global_pool="token").eval()

    images = colour_cells(3, seed=2)
    model = vit(0)
    own = dense_quality(model, images, size=32, reference=model)
    assert set(own) == {"corr_top1", "gram_corr", "gram_mse"}
    assert own["gram_corr"] == pytest.approx(1.0) and own["gram_mse"] == pytest.approx(0.0, abs=1e-10)
    # a reference seen at twice the resolution is compared on the model's grid (as the Gram loss does)
    other = dense_quality(model, images, size=32, reference=vit(1), reference_size=64)
    assert other["gram_mse"] > 0 and -1.0 <= other["gram_corr"] < 1.0
    assert dense_quality(model, images, size=32) == {"corr_top1": own["corr_top1"]}
