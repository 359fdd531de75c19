"""Weighted k-NN classification on L2-normalised features, the k-NN evaluation of the DINOv3 paper
(arXiv 2508.10104) as the official `dinov3/eval/knn.py` runs it: T = 0.07, here k in {10, 20}.

Each test feature votes with its k most cosine-similar training features, each vote weighted by
exp(similarity / T); the class with the largest summed weight wins.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from gramline.errors import InputError


@torch.inference_mode()
def knn_predict(train_x: Tensor, train_y: Tensor, test_x: Tensor, ks: Sequence[int], temperature: float = 0.07,
                num_classes: int | None = None, chunk: int = 1024) -> dict[int, Tensor]:
    """Predicted class per test row for every k (features are L2-normalised here)."""
    if train_x.shape[0] == 0:
        raise InputError("k-NN", "has no training features", "at least one labelled training image")
    num_classes = num_classes or int(train_y.max()) + 1
    train_n = F.normalize(train_x.float(), dim=1)
    test_n = F.normalize(test_x.float(), dim=1)
    k_max = min(max(ks), train_n.shape[0])
    out: dict[int, list[Tensor]] = {k: [] for k in ks}
    for lo in range(0, test_n.shape[0], chunk):
        sims = test_n[lo:lo + chunk] @ train_n.T
        top_sim, top_idx = sims.topk(k_max, dim=1)  # sorted, most similar first
        weights = (top_sim / temperature).exp()
        neighbours = F.one_hot(train_y[top_idx].long(), num_classes).float()  # [B, k, C]
        for k in ks:
            kk = min(k, k_max)
            votes = (neighbours[:, :kk] * weights[:, :kk, None]).sum(dim=1)
            out[k].append(votes.argmax(dim=1))
    return {k: torch.cat(parts) for k, parts in out.items()}


def knn_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, ks: Sequence[int] = (10, 20),
                 temperature: float = 0.07, num_classes: int | None = None) -> dict[int, float]:
    """Top-1 accuracy (0..1) for every k."""
    preds = knn_predict(train_x, train_y, test_x, ks, temperature, num_classes)
    return {k: float((p == test_y).float().mean()) for k, p in preds.items()}
