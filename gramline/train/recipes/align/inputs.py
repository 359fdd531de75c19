"""What the align stage reads besides the dataset: the backbone it aligns, from a Model (or one
student of a distill output) or from starting weights (`--init-from`: public timm weights, a local
weights file for a timm class, an official DINOv3 checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
from torch import nn

from gramline.artifacts import lineage_entry, read_manifest
from gramline.errors import InputError
from gramline.models.archs import ARCHS
from gramline.models.init_from import load_starting_weights
from gramline.models.io import BACKBONE_FILE, load_backbone, timm_manifest_entry

DEFAULT_IMG_SIZE = 224  # for a timm class without a pretrained config


@dataclass
class AlignBackbone:
    """The frozen backbone and what the aligned Model records of it."""

    model: nn.Module  # a plain timm ViT, eval mode
    manifest: dict[str, Any]  # its `timm`, `arch`, `embed_dim`, `patch_size`, `img_size` entries
    label: str  # where it came from (`text_tower.backbone`)
    inputs: list[dict[str, Any]] = field(default_factory=list)  # lineage entries
    record: dict[str, Any] = field(default_factory=dict)  # further manifest entries


def backbone_dir(model: Path, student: str | None, flag: str = "--model") -> Path:
    """The Model directory to align: `model` itself, or one student of a distill output."""
    students = read_manifest(model, "Model", flag).get("students") or {}
    if not students:
        if student is not None:
            raise InputError(f"config field 'align.student' ({student!r})", f"is set, but {flag} {model} is not a "
                             f"distill output with students", f"null, or a distill output as {flag}")
        return model
    if student is None:  # the largest: the one with the most backbone bytes
        student = max(students, key=lambda name: (model / students[name] / BACKBONE_FILE).stat().st_size
                      if (model / students[name] / BACKBONE_FILE).is_file() else -1)
    if student not in students:
        raise InputError(f"config field 'align.student' ({student!r})", f"is not a student of {flag} {model}",
                         "one of " + ", ".join(sorted(students)))
    return model / students[student]


def default_img_size(arch: str) -> int:
    """The input side timm's pretrained config gives the architecture's class."""
    cfg = timm.get_pretrained_cfg(ARCHS[arch].timm_name)
    return int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else DEFAULT_IMG_SIZE


def align_backbone(model: Path | None, init_from: str | None, student: str | None,
                   img_size: int | None) -> AlignBackbone:
    """The backbone `--model` (a Model or distill output) or `--init-from` (a weights spec) names;
    exactly one of them. A directory given to `--init-from` is taken as `--model`. Starting weights
    become a plain timm model of their architecture at `img_size` (None: timm's default side)."""
    if (model is None) == (init_from is None):
        raise InputError("--model / --init-from", "both given" if model is not None else "neither given",
                         "exactly one: --model DIR (a Model or distill output) or --init-from SPEC "
                         "(timm:<name>[@<file>], an official DINOv3 checkpoint)")
    if model is None and Path(str(init_from)).is_dir():
        model, flag = Path(str(init_from)), "--init-from"
    else:
        flag = "--model"
    if model is not None:
        source = backbone_dir(model, student, flag)
        backbone, manifest = load_backbone(source, flag)
        record = {"init_from": {"spec": str(init_from), "kind": "model"}} if init_from is not None else {}
        return AlignBackbone(backbone, manifest, str(source), [lineage_entry("backbone", source)], record)
    assert init_from is not None
    if student is not None:
        raise InputError(f"config field 'align.student' ({student!r})", f"is set, but --init-from {init_from} is not "
                         "a distill output with students", "null, or a distill output as --model")
    start = load_starting_weights(init_from)
    arch = ARCHS[start.arch]
    size = img_size or default_img_size(start.arch)
    vit = start.timm_backbone(size)
    manifest = {"timm": timm_manifest_entry(arch.timm_name, arch.timm_kwargs(size)), "arch": start.arch,
                "embed_dim": arch.embed_dim, "patch_size": arch.patch_size, "img_size": size}
    record = {"init_from": {"spec": init_from, **start.record, "arch": start.arch}}
    return AlignBackbone(vit, manifest, init_from, [], record)
