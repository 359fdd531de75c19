"""Zero-shot hook: the interface works with any text-aligned model; without one it says why."""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from gramline.eval import zeroshot
from gramline.eval.features import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, ModelSpec
from gramline.eval.zeroshot import (
    TextAligned,
    ZeroShotUnavailable,
    class_embeddings,
    text_tower_of,
    zero_shot_accuracy,
    zero_shot_predict,
)

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


class MockColourTower:
    """A stand-in text tower: images embed as their mean RGB, patches (4 px) as theirs, texts as the
    RGB of the colour word they contain."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_patches(images).mean(dim=(1, 2))

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        rgb = torch.nn.functional.avg_pool2d(images * std + mean, 4) - 0.5
        return rgb.permute(0, 2, 3, 1)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            rgb = next(v for k, v in COLOURS.items() if k in text)
            rows.append(torch.tensor(rgb) - 0.5)
        return torch.stack(rows)


def solid(rgb: tuple[float, float, float]) -> torch.Tensor:
    x = torch.tensor(rgb).view(3, 1, 1).expand(3, 8, 8)
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def test_zero_shot_with_mock_colour_tower() -> None:
    tower = MockColourTower()
    assert isinstance(tower, TextAligned)
    names = ["red", "green", "blue"]
    images = torch.stack([solid((0.9, 0.1, 0.1)), solid((0.1, 0.1, 0.8)), solid((0.2, 0.7, 0.2))])
    assert zero_shot_predict(tower, images, names).tolist() == [0, 2, 1]
    assert zero_shot_accuracy(tower, images, torch.tensor([0, 2, 1]), names) == 1.0
    assert zero_shot_accuracy(tower, images, torch.tensor([0, 1, 2]), names) == pytest.approx(1 / 3)
    emb = class_embeddings(tower, names, templates=("a {} thing", "the colour {}"))
    assert emb.norm(dim=1).tolist() == pytest.approx([1.0, 1.0, 1.0])


def _model(manifest: dict | None, tower=None) -> LoadedModel:
    return LoadedModel("m", ModelSpec("m", "dir", "/nowhere"), torch.nn.Identity(), manifest, None, tower)


def test_a_model_without_text_tower_gives_a_skip_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ZeroShotUnavailable, match="no text tower"):
        text_tower_of(_model({"kind": "Model", "stage": "pretrain"}))
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "gramline.models.text", None)  # as before the align stage: import fails
        with pytest.raises(ZeroShotUnavailable, match="no loader"):
            text_tower_of(_model({"kind": "Model", "stage": "align", "text_tower": {"name": "x"}}))
    with pytest.raises(ZeroShotUnavailable, match="lacks encode_image"):
        text_tower_of(_model(None, tower=object()))
    tower = MockColourTower()
    assert text_tower_of(_model(None, tower=tower)) is tower


def test_an_align_model_is_loaded_from_its_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    tower = MockColourTower()

    def load_aligned(*args: object) -> MockColourTower:
        calls.append(args)
        return tower

    monkeypatch.setitem(sys.modules, "gramline.models.text", types.SimpleNamespace(load_aligned=load_aligned))
    assert text_tower_of(_model({"kind": "Model", "stage": "align", "text_tower": {"name": "x"}})) is tower
    assert calls == [(Path("/nowhere"),)]
    assert zeroshot.TEXT_MANIFEST_KEY == "text_tower"
