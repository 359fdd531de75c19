"""The distill stage's config: several students, one frozen teacher (DINOv3 paper §5; official
`dinov3/train/multidist_meta_arch.py`, `dinov3/configs/train/dinov3_vitl16_lvd1689m_distilled.yaml`).

`distill.students` names each student's architecture (and optionally its start, heads, optimizer);
the other sections are shared: every student sees the same crops and masks and has the same losses
(DINO global + local with the recipe's pair weights, iBOT at the teacher's masked positions on an
unmasked student input, KoLeo; no Gram). `distill.ranks` splits the processes of a `torchrun` run
into one group per student (default: by student size); on one process the students take turns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import Field, model_validator

from gramline.config import Strict, resolve_config
from gramline.errors import InputError
from gramline.models.archs import ARCHS
from gramline.models.config import HeadsConfig
from gramline.presets import stage_preset
from gramline.train.config import CropTrainingConfig, OptimConfig, check_ddp_without_teacher_checkpoints
from gramline.train.schedules import Schedule


class StudentConfig(Strict):
    arch: str  # a name of gramline.models.archs.ARCHS
    img_size: int | None = None  # the exported model's nominal input side (default: crops.global_size)
    drop_path_rate: float = 0.0  # the official distillation uses none
    layerscale_init: float = 1e-5
    rope_rescale_coords: float | None = 2.0
    # weights to start from: timm:<name>[@<file>], a Model directory or an official DINOv3 checkpoint (the
    # backbone, of this arch; the mask token and heads too when it has them in this student's sizes)
    init: str | None = None
    heads: HeadsConfig | None = None  # None: the teacher's head sizes (the prototype counts must be the teacher's)
    optim: OptimConfig | None = None  # None: the stage's `optim`


class DistillSettings(Strict):
    students: dict[str, StudentConfig] = Field(default_factory=dict)
    ranks: dict[str, list[int]] | None = None  # processes of each student under torchrun; None: by size


class DistillLossConfig(Strict):
    dino_weight: float = 1.0
    koleo_weight: float = 0.1
    ibot_weight: float = 1.0
    student_temp: float = 0.1
    teacher_temp: Schedule = Schedule.constant(0.07)
    local_weight: Schedule = Schedule.constant(1.0)
    sinkhorn_iters: int = 3


class DistillConfig(CropTrainingConfig):
    distill: DistillSettings = DistillSettings()
    loss: DistillLossConfig = DistillLossConfig()

    @property
    def patch_size(self) -> int:
        """The students' common patch size (the iBOT positions are the teacher's patches)."""
        return ARCHS[next(iter(self.distill.students.values())).arch].patch_size

    @model_validator(mode="after")
    def _consistent(self) -> DistillConfig:
        students = self.distill.students
        if not students:
            raise ValueError("distill.students is empty; give at least one student (--student NAME=ARCH)")
        crops = self.crops
        for name, student in students.items():
            where = f"distill.students.{name}"
            if student.arch not in ARCHS:
                raise ValueError(f"{where}.arch {student.arch!r} is unknown; expected one of {sorted(ARCHS)}")
            patch = ARCHS[student.arch].patch_size
            for field, size in (("crops.global_size", crops.global_size), ("crops.local_size", crops.local_size)):
                if size <= 0 or size % patch:
                    raise ValueError(f"{where}.arch {student.arch} has patch size {patch}, which does not divide "
                                     f"{field}={size}")
        patches = {ARCHS[s.arch].patch_size for s in students.values()}
        if len(patches) > 1:
            raise ValueError(f"distill.students have different patch sizes {sorted(patches)}; the iBOT targets are "
                             "per teacher patch, so every student needs the teacher's patch size")
        if crops.gram_size is not None:
            raise ValueError("crops.gram_size is set, but distillation has no Gram term; leave it null")
        check_ddp_without_teacher_checkpoints(self.train, "distill", "trains each student with DDP over its own "
                                              "ranks")
        return self


def parse_students(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """`--student NAME=ARCH` flags as a students tree."""
    students: dict[str, dict[str, str]] = {}
    for item in items:
        name, sep, arch = item.partition("=")
        if not sep or not name or not arch or "." in name:
            raise InputError(f"--student {item!r}", "is malformed", "NAME=ARCH, e.g. small=vits16 (no dot in NAME)")
        if name in students:
            raise InputError(f"--student {item!r}", f"repeats the name {name!r}", "each student name once")
        students[name] = {"arch": arch}
    return students


def load_distill_config(preset: str, config_file: Path | str | None, overrides: Sequence[str],
                        students: Sequence[str] = ()) -> DistillConfig:
    """Preset ← file ← `--set` overrides; `--student` flags, when given, replace the preset's students."""
    tree = stage_preset("distill", preset)
    if students:
        tree.setdefault("distill", {})["students"] = parse_students(students)
    return resolve_config(DistillConfig, tree, config_file, overrides)


def check_heads(config: DistillConfig, teacher_heads: HeadsConfig, flag: str) -> Mapping[str, HeadsConfig]:
    """Each student's head sizes: the teacher's, or its own with the teacher's prototype counts."""
    out = {}
    for name, student in config.distill.students.items():
        heads = student.heads or teacher_heads
        for field in ("dino_prototypes", "ibot_prototypes"):
            mine, theirs = getattr(heads, field), getattr(teacher_heads, field)
            if mine != theirs:
                raise InputError(f"config field 'distill.students.{name}.heads.{field}'",
                                 f"is {mine}, but the teacher in {flag} has {theirs} prototypes",
                                 "the teacher's prototype count: the student learns the teacher's assignments")
        out[name] = heads
    return out
