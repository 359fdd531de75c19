"""What the default tiny pretrain learns (the README's main job), measured against random init."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gramline.eval.features import LoadedModel, ModelSpec, extract_features, load_eval_data, split_indices
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
    # measured (2 runs): total 7.14 → 6.78 and iBOT 2.22 → 1.96 over 200-300 steps
    assert last < first["total"] - 0.15
    assert np.mean([row["ibot"] for row in curve[-3:]]) < first["ibot"] - 0.1


def _knn(module: torch.nn.Module, data_dir: Path) -> float:
    data = load_eval_data(data_dir)
    train, test = split_indices(data.labels, 0.5, 0)
    features = extract_features(LoadedModel("m", ModelSpec("m", "random", "tiny"), module), data.images, 64,
                                keep_patches=False)
    labels = torch.from_numpy(data.labels)
    return knn_accuracy(features.cls[train], labels[train], features.cls[test], labels[test])[20]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known gap: 200-600 tiny steps leave kNN on the shapes world at chance "
                                       "(measured 0.07-0.11 vs 0.09-0.12 random, 10 classes); see issue notes")
def test_tiny_pretrain_beats_random_init_on_knn(tiny_pretrain_run: tuple[Path, Path]) -> None:
    data, model = tiny_pretrain_run
    trained, _ = load_backbone(model)
    random_scores = [_knn(build_random_backbone("tiny", 64, seed), data) for seed in range(3)]
    assert _knn(trained, data) >= max(random_scores) + 0.05
