"""What the default tiny pretrain learns (the README's main job), measured against random init."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gramline.data.synthetic import COLOURS, key_index, render_sample
from gramline.eval.features import (
    EvalData,
    LoadedModel,
    ModelSpec,
    extract_features,
    load_eval_data,
    split_indices,
)
from gramline.eval.knn import knn_accuracy
from gramline.models.io import build_random_backbone, load_backbone


def _curve(model: Path) -> list[dict]:
    return [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_pretrain_losses_fall(tiny_pretrain_run: tuple[Path, Path]) -> None:
    _, model = tiny_pretrain_run
    curve = _curve(model)
    assert curve[-1]["step"] == json.loads((model / "manifest.json").read_text())["step"] == 200
    first, last = curve[0], np.mean([row["total"] for row in curve[-3:]])
    # measured (2 seeds, 200 steps): total 7.9-8.0 → 6.0, DINO global 5.0-5.5 → 4.4-4.5, iBOT 2.5 → 1.4-1.5
    assert last < first["total"] - 0.5
    assert np.mean([row["ibot"] for row in curve[-3:]]) < first["ibot"] - 0.3


@pytest.fixture(scope="module")
def eval_data(tiny_pretrain_run: tuple[Path, Path]) -> EvalData:
    return load_eval_data(tiny_pretrain_run[0])


def _knn(module: torch.nn.Module, data: EvalData, labels: np.ndarray | None = None) -> float:
    """kNN (k=20) on the eval split's CLS features, for the class labels or the `labels` given."""
    labels = data.labels if labels is None else labels
    train, test = split_indices(labels, 0.5, 0)
    features = extract_features(LoadedModel("m", ModelSpec("m", "random", "tiny"), module), data.images, 64,
                                keep_patches=False)
    y = torch.from_numpy(labels)
    return knn_accuracy(features.cls[train], y[train], features.cls[test], y[test])[20]


def _main_colours(data: EvalData) -> np.ndarray:
    """The main object's colour (an index into COLOURS) for each eval image, re-rendered from its key."""
    names = [name for name, _ in COLOURS]
    return np.array([names.index(render_sample(0, key_index(key), 64).main_colour) for key in data.keys])


@pytest.mark.slow
def test_tiny_pretrain_learns_view_invariant_features(tiny_pretrain_run: tuple[Path, Path],
                                                      eval_data: EvalData) -> None:
    """What the tiny run does learn: a property shared by all views of an image and not by other
    images. The main object's colour (11 colours, drawn independently of the class) survives the
    preset's mild colour jitter; a random-init CLS does not encode it. Measured on this split at 200
    steps: 0.55-0.69 (2 seeds) against 0.09-0.11 for random init (chance 0.09)."""
    colours = _main_colours(eval_data)
    trained, _ = load_backbone(tiny_pretrain_run[1])
    random_scores = [_knn(build_random_backbone("tiny", 64, seed), eval_data, colours) for seed in range(3)]
    assert max(random_scores) < 0.2
    assert _knn(trained, eval_data, colours) >= max(random_scores) + 0.25


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known gap: the tiny run learns colour, not shape. Class kNN stays at "
                                       "chance (0.08-0.13 vs 0.09-0.11 random, 10 classes) for 200-2000 steps, "
                                       "whatever the crops, jitter or temperatures; see issue notes")
def test_tiny_pretrain_beats_random_init_on_knn(tiny_pretrain_run: tuple[Path, Path], eval_data: EvalData) -> None:
    trained, _ = load_backbone(tiny_pretrain_run[1])
    random_scores = [_knn(build_random_backbone("tiny", 64, seed), eval_data) for seed in range(3)]
    assert _knn(trained, eval_data) >= max(random_scores) + 0.05
