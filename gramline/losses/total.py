"""Composing a total loss from named terms, and the DINO recipe's weights (DINOv3 paper §3, official
`dinov3/train/ssl_meta_arch.py::compute_losses`).

L = w_dino · [local_scale · w_local(it) · L_dino_local + global_scale · L_dino_global]
  + w_koleo · n_g · mean_crops(L_koleo) + w_ibot · L_ibot + w_gram(it) · L_gram
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from gramline.errors import InputError


def dino_pair_weights(n_global: int, n_local: int) -> tuple[float, float]:
    """(local_scale, global_scale) in proportion to the crop pairs each DINO term averages.

    Local pairs: n_local student crops × n_global teacher crops; global pairs: n_global ×
    (n_global − 1), the same-view pairs being dropped. 2 global + 8 local crops give 8/9, 1/9.
    """
    if n_global < 1 or n_local < 0:
        raise InputError("crops", f"n_global={n_global}, n_local={n_local}", "n_global >= 1 and n_local >= 0")
    local_pairs = n_local * n_global
    global_pairs = n_global * (n_global - 1)
    if local_pairs + global_pairs == 0:
        raise InputError("crops", "1 global crop and no local crops leave no DINO pairs", "more crops")
    total = local_pairs + global_pairs
    return local_pairs / total, global_pairs / total


@dataclass(frozen=True)
class LossWeights:
    """This step's loss weights; `local` and `gram` are the current values of their schedules."""

    dino: float = 1.0
    local: float = 1.0
    koleo: float = 0.1
    ibot: float = 1.0
    gram: float = 0.0
    n_global: int = 2
    n_local: int = 8


def weighted_sum(terms: Mapping[str, Tensor], factors: Mapping[str, float]) -> tuple[Tensor, dict[str, float]]:
    """Σ factors[name] · mean(terms[name]) over the terms present, summed in the order of `factors`.

    Any recipe composes its total this way: a term is a tensor (a scalar, or several values that are
    averaged, e.g. KoLeo per global crop) under a name with a factor for this step. The log dict
    has each term unweighted under its name, weighted under `<name>_weighted`, and `total`; it is
    read back from the device in one transfer. A term without a factor is an error.
    """
    unknown = sorted(set(terms) - set(factors))
    if unknown:
        raise ValueError(f"loss terms {unknown} are unknown here; known: {list(factors)}")
    names = [name for name in factors if name in terms]
    if not names:
        raise ValueError("no loss terms to combine")
    raw = [terms[name].float().mean() for name in names]
    weighted = [factors[name] * value for name, value in zip(names, raw)]
    total = torch.stack(weighted).sum()
    values = torch.stack([*raw, *weighted, total]).detach().cpu().tolist()
    return total, dict(zip([*names, *(f"{n}_weighted" for n in names), "total"], values))


def dino_factors(weights: LossWeights) -> dict[str, float]:
    """The factor of each DINO-recipe term, in the official order of summation."""
    local_scale, global_scale = dino_pair_weights(weights.n_global, weights.n_local)
    return {
        "dino_local": weights.dino * local_scale * weights.local,
        "dino_global": weights.dino * global_scale,
        "koleo": weights.koleo * weights.n_global,
        "ibot": weights.ibot,
        "gram": weights.gram,
    }


def combine_losses(terms: Mapping[str, Tensor], weights: LossWeights) -> tuple[Tensor, dict[str, float]]:
    """The DINO recipe's total: `weighted_sum` of dino_local, dino_global, koleo, ibot and gram
    (absent ones are skipped); `koleo` is the per-global-crop losses [n_g] or their mean."""
    return weighted_sum(terms, dino_factors(weights))
