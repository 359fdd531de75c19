"""Linear probe on frozen features: concat(CLS, mean patch token) -> one Linear layer, the input and
head of the official `dinov3/eval/linear.py` (`create_linear_input` with avgpool, `LinearClassifier`).

One classifier per learning rate of a small grid is trained on the same minibatches (SGD, momentum
0.9, no weight decay, cosine decay, weights initialised with std 0.01); the one with the best
validation accuracy is kept and its test accuracy reported. Seeded, so runs repeat exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)


@dataclass
class LinearResult:
    best_lr: float
    val_top1: float
    test_top1: float
    val_by_lr: dict[float, float]


def probe_input(cls: Tensor, mean_patch: Tensor) -> Tensor:
    return torch.cat([cls.float(), mean_patch.float()], dim=1)


def _accuracy(weight: Tensor, bias: Tensor, x: Tensor, y: Tensor) -> float:
    logits = x @ weight + bias
    if not torch.isfinite(logits).all():
        return -1.0  # diverged at this learning rate
    return float((logits.argmax(dim=1) == y).float().mean())


def linear_probe(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, test_x: Tensor, test_y: Tensor,
                 num_classes: int, lrs: Sequence[float] = DEFAULT_LRS, epochs: int = 100, batch_size: int = 128,
                 seed: int = 0) -> LinearResult:
    """Train one head per learning rate; keep the best on validation; report its test accuracy.

    All heads live in one [L, D, C] tensor and take the same minibatches; SGD with momentum is
    written out so each head gets its own learning rate in one batched update.
    """
    generator = torch.Generator().manual_seed(seed)
    n, dim = train_x.shape
    heads = len(lrs)
    weight = torch.empty(heads, dim, num_classes).normal_(0.0, 0.01, generator=generator).requires_grad_(True)
    bias = torch.zeros(heads, 1, num_classes, requires_grad=True)
    rates = torch.tensor([float(lr) for lr in lrs])
    v_weight, v_bias = torch.zeros_like(weight), torch.zeros_like(bias)
    batch_size = min(batch_size, n)
    total = max(1, epochs * math.ceil(n / batch_size))
    train_x, train_y = train_x.float(), train_y.long()
    step = 0
    with torch.enable_grad():
        for _epoch in range(epochs):
            order = torch.randperm(n, generator=generator)
            for lo in range(0, n, batch_size):
                idx = order[lo:lo + batch_size]
                logits = torch.matmul(train_x[idx], weight) + bias  # [L, B, C]
                target = train_y[idx].repeat(heads)
                # the sum of the per-head mean losses: each head's gradient is its own mean-loss gradient
                loss = F.cross_entropy(logits.reshape(-1, num_classes), target, reduction="sum") / len(idx)
                g_weight, g_bias = torch.autograd.grad(loss, (weight, bias))
                lr = rates * 0.5 * (1 + math.cos(math.pi * step / total))  # cosine decay per head
                with torch.no_grad():
                    v_weight.mul_(0.9).add_(g_weight)
                    v_bias.mul_(0.9).add_(g_bias)
                    weight.sub_(lr.view(-1, 1, 1) * v_weight)
                    bias.sub_(lr.view(-1, 1, 1) * v_bias)
                step += 1
    with torch.no_grad():
        val = [_accuracy(weight[i], bias[i], val_x.float(), val_y.long()) for i in range(heads)]
        best = max(range(heads), key=lambda i: (val[i], -i))
        test = _accuracy(weight[best], bias[best], test_x.float(), test_y.long())
    return LinearResult(float(lrs[best]), val[best], max(test, 0.0), {float(lr): v for lr, v in zip(lrs, val)})
