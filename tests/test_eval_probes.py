"""k-NN and linear probe on feature sets whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gramline.eval.features import split_indices, torch_threads
from gramline.eval.knn import knn_accuracy, knn_predict
from gramline.eval.linear import linear_probe


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def clusters(n_per_class: int, classes: int, dim: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-separated Gaussian clusters around random unit centres (plus a shared offset, so raw
    features are not centred, as real ones are not)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=1)
    offset = torch.randn(dim, generator=g) * 0.5
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + offset + noise * torch.randn(len(y), dim, generator=g)
    return x, y


def test_knn_weighted_vote_matches_hand_computation() -> None:
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.1]])
    # cosines: 0.995, 0.856, 0.0995. T=0.07: e^(14.21) beats e^(12.22)+e^(1.42) -> class 0.
    assert knn_predict(train, labels, test, [1, 3], temperature=0.07)[3].tolist() == [0]
    # T=1: e^0.995=2.70 < e^0.856+e^0.0995=2.35+1.10 -> the two class-1 neighbours outvote.
    assert knn_predict(train, labels, test, [1, 3], temperature=1.0)[3].tolist() == [1]
    assert knn_predict(train, labels, test, [1], temperature=1.0)[1].tolist() == [0]


def test_knn_is_scale_invariant_and_near_perfect_on_clusters() -> None:
    x, y = clusters(60, 5, 32, noise=0.08, seed=0)
    train, test = split_indices(y.numpy(), 0.5, seed=0)
    acc = knn_accuracy(x[train], y[train], x[test], y[test], ks=(10, 20))
    assert acc[10] >= 0.98 and acc[20] >= 0.98
    scaled = knn_accuracy(x[train] * 7.0, y[train], x[test] * 0.1, y[test], ks=(10, 20))
    assert scaled == acc  # features are L2-normalised inside


def test_knn_on_shuffled_labels_is_near_chance() -> None:
    x, y = clusters(60, 5, 32, noise=0.08, seed=0)
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    train, test = split_indices(y.numpy(), 0.5, seed=0)
    acc = knn_accuracy(x[train], y[train], x[test], y[test], ks=(20,))
    assert acc[20] < 0.45  # chance is 0.2


def test_linear_probe_near_perfect_and_deterministic() -> None:
    x, y = clusters(50, 6, 48, noise=0.15, seed=2)
    train, test = split_indices(y.numpy(), 0.5, seed=0)
    fit, val = split_indices(y[train].numpy(), 0.2, seed=0)
    fit, val = train[fit], train[val]
    args = (x[fit], y[fit], x[val], y[val], x[test], y[test], 6)
    first = linear_probe(*args, lrs=(1e-3, 1e-2, 0.1), epochs=60, batch_size=64, seed=0)
    again = linear_probe(*args, lrs=(1e-3, 1e-2, 0.1), epochs=60, batch_size=64, seed=0)
    assert first.test_top1 >= 0.97
    assert first == again
    assert set(first.val_by_lr) == {1e-3, 1e-2, 0.1}
    assert first.val_by_lr[first.best_lr] == max(first.val_by_lr.values())


def test_linear_probe_picks_the_learning_rate_by_validation() -> None:
    # lr 1e-7 barely moves from the std-0.01 init in 5 epochs; lr 0.1 solves it: 0.1 must win on val.
    x, y = clusters(40, 4, 16, noise=0.3, seed=3)
    idx = np.arange(len(y))
    result = linear_probe(x[idx[::2]], y[idx[::2]], x[idx[1::2]], y[idx[1::2]], x, y, 4, lrs=(1e-7, 0.1),
                          epochs=5, batch_size=32)
    assert result.best_lr == 0.1
    assert result.val_by_lr[1e-7] < result.val_by_lr[0.1]


def test_linear_probe_diverged_rate_is_never_chosen() -> None:
    x, y = clusters(30, 3, 8, noise=0.1, seed=4)
    result = linear_probe(x * 1e6, y, x * 1e6, y, x * 1e6, y, 3, lrs=(1e30, 1e-12), epochs=3)
    assert result.val_by_lr[1e30] == -1.0  # non-finite logits count as diverged
    assert result.best_lr == 1e-12 and math.isfinite(result.test_top1)


def test_split_is_seeded_disjoint_and_stratified() -> None:
    labels = np.repeat(np.arange(4), 10)
    a_train, a_test = split_indices(labels, 0.5, seed=0)
    b_train, b_test = split_indices(labels, 0.5, seed=0)
    c_train, _ = split_indices(labels, 0.5, seed=1)
    assert a_train.tolist() == b_train.tolist() and a_test.tolist() == b_test.tolist()
    assert a_train.tolist() != c_train.tolist()
    assert sorted(a_train.tolist() + a_test.tolist()) == list(range(40))
    assert np.bincount(labels[a_test]).tolist() == [5, 5, 5, 5]


def test_split_works_when_a_class_has_one_image() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 2])
    train, test = split_indices(labels, 0.5, seed=0)
    assert len(train) + len(test) == 7 and len(test) >= 1 and len(train) >= 1


@pytest.mark.parametrize("n", [0, 1])
def test_split_refuses_fewer_than_two(n: int) -> None:
    from gramline.errors import InputError

    with pytest.raises(InputError):
        split_indices(np.zeros(n, dtype=np.int64), 0.5, seed=0)
