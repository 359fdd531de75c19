"""How closely a student reproduces its teacher on images neither trained on (the eval split).

- Linear CKA between student and teacher CLS features (Kornblith et al. 2019, "Similarity of
  neural network representations revisited"): 1 = the same representation up to rotation and
  scale, near 0 = unrelated.
- Prototype agreement: the share of images whose top-1 DINO prototype is the same for the student's
  head and the teacher's.

Each student is scored next to a random-init model of its architecture, the baseline that shows
what distillation added.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from gramline.eval.features import load_eval_data, preprocess
from gramline.train.recipes.dino.model import DinoModel


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of features x [N, D1] and y [N, D2] (rows: the same N images)."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).square().sum()
    return float(cross / ((x.T @ x).square().sum().sqrt() * (y.T @ y).square().sum().sqrt()))


@torch.inference_mode()
def cls_and_prototypes(model: DinoModel, images: Tensor, batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """(CLS features [N, D], top-1 DINO prototype [N]) of preprocessed images, in eval mode."""
    model.eval()
    feats, protos = [], []
    for lo in range(0, len(images), batch_size):
        cls = model.backbone.forward_group(images[lo:lo + batch_size])["cls"].float()
        feats.append(cls)
        protos.append(model.dino_head(cls).argmax(dim=-1))
    return torch.cat(feats), torch.cat(protos)


def agreement(teacher: DinoModel, student: DinoModel, images: Tensor) -> dict[str, float]:
    t_cls, t_proto = cls_and_prototypes(teacher, images)
    s_cls, s_proto = cls_and_prototypes(student, images)
    return {"cka_cls": linear_cka(s_cls, t_cls), "prototype_agreement": float((s_proto == t_proto).float().mean())}


def distillation_agreement(teacher: DinoModel, students: Mapping[str, DinoModel], baselines: Mapping[str, DinoModel],
                           dataset: Path, size: int, max_images: int = 256) -> dict[str, float]:
    """`<student>/cka_cls`, `<student>/prototype_agreement` and the same for `random_<student>`."""
    data = load_eval_data(dataset, max_images=max_images, flag="--dataset")
    device = next(teacher.parameters()).device
    images = preprocess(data.images, size).to(device)
    out: dict[str, float] = {}
    for name, student in students.items():
        out |= {f"{name}/{k}": v for k, v in agreement(teacher, student.to(device), images).items()}
        out |= {f"random_{name}/{k}": v for k, v in agreement(teacher, baselines[name].to(device), images).items()}
    return out
