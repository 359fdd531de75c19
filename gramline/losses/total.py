"""The recipe's total loss (reference §1.6) and the DINO pair weights.

L = w_dino · [local_scale · w_local(it) · L_dino_local + global_scale · L_dino_global]
  + w_koleo · n_g · mean_crops(L_koleo) + w_ibot · L_ibot + w_gram(it) · L_gram
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gramline.errors import InputError

TERMS = ("dino_local", "dino_global", "koleo", "ibot", "gram")


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


def combine_losses(terms: dict[str, Tensor], weights: LossWeights) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of the present loss terms, and a log dict of floats.

    Keys of `terms`: dino_local, dino_global, koleo, ibot, gram; absent ones are skipped. `koleo`
    is either the per-global-crop losses [n_g] or their mean (a scalar). The log dict has each
    term unweighted under its own name, weighted under `<name>_weighted`, and `total`; it is
    read back from the device in one transfer.
    """
    unknown = sorted(set(terms) - set(TERMS))
    if unknown:
        raise ValueError(f"combine_losses got unknown terms {unknown}; known: {list(TERMS)}")
    if not terms:
        raise ValueError("combine_losses got no loss terms")
    local_scale, global_scale = dino_pair_weights(weights.n_global, weights.n_local)
    factors = {
        "dino_local": weights.dino * local_scale * weights.local,
        "dino_global": weights.dino * global_scale,
        "koleo": weights.koleo * weights.n_global,
        "ibot": weights.ibot,
        "gram": weights.gram,
    }
    names = [name for name in TERMS if name in terms]
    raw = [
        terms[name].float().mean() if name == "koleo" else terms[name].float().reshape(()) for name in names
    ]
    weighted = [factors[name] * value for name, value in zip(names, raw)]
    total = torch.stack(weighted).sum()
    values = torch.stack([*raw, *weighted, total]).detach().cpu().tolist()
    log = dict(zip([*names, *(f"{n}_weighted" for n in names), "total"], values))
    return total, log
