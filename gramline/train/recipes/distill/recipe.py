"""The distillation recipe: several students learn one frozen teacher's DINO and iBOT assignments.

Each step the teacher (a DinoModel with its heads, frozen) runs once on the global crops; its CLS and
masked-patch features go through its heads, and Sinkhorn-Knopp turns them into targets, once. Every
student (its own backbone, DINO and iBOT heads, optimizer, schedules and EMA copy) is trained on the
same crops against those targets: DINO global + local, iBOT at the teacher's masked positions with
an unmasked student input, KoLeo; no Gram (official `dinov3/train/multidist_meta_arch.py`). Under
`torchrun` each student trains on its own ranks (gramline.train.recipes.distill.groups); on one
process the students take turns. Each student draws its random numbers (init, RoPE rescale) from
its own generator, so a student trains the same whatever the process layout.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from gramline.artifacts import build_manifest, write_manifest
from gramline.config import dump_config
from gramline.data.collate import CropBatch
from gramline.losses.koleo import koleo_loss
from gramline.losses.sinkhorn import sinkhorn_knopp
from gramline.losses.total import LossWeights, combine_losses
from gramline.models.config import BackboneConfig, HeadsConfig
from gramline.train import distributed
from gramline.train.checkpoint import Stateful
from gramline.train.config import OptimConfig
from gramline.train.export import write_model_artifact
from gramline.train.optimizer import OptimizerValues, ScheduledAdamW
from gramline.train.param_groups import build_param_groups, scaled_lr
from gramline.train.recipe import StepValues
from gramline.train.recipes.dino.config import DinoConfig
from gramline.train.recipes.dino.model import DinoModel
from gramline.train.recipes.dino.recipe import N_GLOBAL, TeacherTargets, ssl_terms
from gramline.train.recipes.distill.config import DistillConfig
from gramline.train.recipes.distill.groups import (
    StudentGroups,
    assign_ranks,
    chunk_rows,
    gather_crop_major,
    gather_masked,
)
from gramline.train.recipes.distill.inputs import student_init
from gramline.train.runtime import Runtime
from gramline.train.schedules import Timeline
from gramline.train.teachers import EmaTeacher, FrozenTeacher, ModulePart

TERMS = ("total", "dino_local", "dino_global", "ibot", "koleo")
STUDENTS_DIR = "students"


@dataclass
class RngState:
    """A student's own random stream (a part: its state is checkpointed)."""

    seed: int
    state: dict[str, Tensor] = field(default_factory=dict)

    @contextlib.contextmanager
    def active(self, device: torch.device) -> Iterator[None]:
        cuda = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            if not self.state:
                torch.manual_seed(self.seed)
            else:
                torch.set_rng_state(self.state["cpu"])
                if cuda:
                    torch.cuda.set_rng_state(self.state["cuda"], device)
            yield
            self.state = {"cpu": torch.get_rng_state()}
            if cuda:
                self.state["cuda"] = torch.cuda.get_rng_state(device)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, **self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.state = {k: v for k, v in state.items() if k != "seed"}


@dataclass
class Student:
    name: str
    backbone: BackboneConfig
    heads: HeadsConfig
    optim: OptimConfig
    init: Mapping[str, Tensor] | None
    rng: RngState
    ranks: tuple[int, ...] = ()
    model: DinoModel | None = None
    ema: EmaTeacher | None = None
    optimizer: ScheduledAdamW | None = None
    forward: nn.Module | None = None
    group: Any = None  # its ranks' process group (None: one process)
    lr: Timeline | None = None
    weight_decay: Timeline | None = None
    lr_scale: float = 1.0

    def dino_config(self, config: DistillConfig) -> DinoConfig:
        """The student as a DINO run's config (its Model artifact can be continued by gram/highres)."""
        return DinoConfig(preset=config.preset, backbone=self.backbone, heads=self.heads, crops=config.crops,
                          masking=config.masking, optim=self.optim, ema=config.ema, data=config.data,
                          train=config.train)


def seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class DistillRecipe:
    name = "distill"
    upgrade = None

    def __init__(self, config: DistillConfig, teacher: DinoModel, heads: Mapping[str, HeadsConfig],
                 log: bool = True) -> None:
        """`teacher`: the frozen teacher with its heads; `heads`: each student's head sizes
        (config.check_heads). A student with `init` starts from the weights it names (read here,
        so a bad one fails before anything is written)."""
        self.config = config
        self.teacher = FrozenTeacher(teacher)
        self.log = log
        self.students = []
        for i, (name, spec) in enumerate(config.distill.students.items()):
            backbone = BackboneConfig(arch=spec.arch, img_size=spec.img_size or config.crops.global_size,
                                      drop_path_rate=spec.drop_path_rate, layerscale_init=spec.layerscale_init,
                                      rope_rescale_coords=spec.rope_rescale_coords)
            init = (student_init(spec.init, backbone, heads[name], f"distill.students.{name}.init")
                    if spec.init else None)
            self.students.append(Student(name, backbone, heads[name], spec.optim or config.optim, init,
                                         RngState(seed_of(config.train.seed, i))))
        self.loss_names = [f"{s.name}.{term}" for s in self.students for term in TERMS[1:]]
        self.progress_keys = ["total", *(f"{s.name}.total" for s in self.students)]

    # ------------------------------------------------------------------ building

    def plan_groups(self, world_size: int) -> StudentGroups:
        """Student → ranks for `world_size` processes (exit 2 when they do not fit)."""
        sizes = {s.name: _param_count(s) for s in self.students}
        return assign_ranks(sizes, world_size, self.config.distill.ranks, self.config.train.batch_size * world_size)

    def build(self, runtime: Runtime) -> None:
        cfg, env = self.config, runtime.env
        self.runtime = runtime
        self.teacher.to(runtime.device)
        global_batch = cfg.train.batch_size * env.world_size
        self.groups: StudentGroups = self.plan_groups(env.world_size)
        for student in self.students:  # every rank creates every group, in the same order
            student.ranks = self.groups.ranks[student.name]
            student.group = dist.new_group(list(student.ranks)) if env.enabled else None
        self.mine = [s for s in self.students if env.rank in s.ranks]
        self.chunk = self.groups.chunk_of(env.rank)
        for student in self.mine:
            self._build_student(student, runtime, global_batch)

    def _build_student(self, student: Student, runtime: Runtime, global_batch: int) -> None:
        cfg, device = self.config, runtime.device
        with student.rng.active(device):
            model = DinoModel(student.backbone, student.heads).to(device)
        if student.init is not None:
            model.load_state_dict(student.init, strict=False)
            student.init = None
        model.backbone.mask_token.requires_grad_(False)  # a student never sees masked input
        model.backbone.activation_checkpointing = cfg.train.activation_checkpointing
        student.model = model
        student.ema = EmaTeacher(model)
        student.lr_scale = scaled_lr(1.0, student.optim.lr_scaling, global_batch)
        groups = build_param_groups(model.backbone, model.heads(), len(model.backbone.vit.blocks),
                                    student.optim.layerwise_decay, student.optim.patch_embed_lr_mult)
        student.optimizer = ScheduledAdamW(model, groups, student.optim.betas, student.optim.clip_grad,
                                           {"backbone": model.backbone, **model.heads()}, device)
        student.lr = Timeline.of(student.optim.lr, cfg.train.steps)
        student.weight_decay = Timeline.of(student.optim.weight_decay, cfg.train.steps)
        student.forward = distributed.parallelize(model, runtime.env, "ddp", cfg.train.compile, group=student.group,
                                                  group_size=len(student.ranks))
        model.train()

    def parts(self) -> dict[str, Stateful]:
        parts: dict[str, Stateful] = {}
        for s in self.mine:
            assert s.model is not None and s.ema is not None and s.optimizer is not None
            parts |= {f"{s.name}.student": ModulePart(s.model), f"{s.name}.ema": s.ema,
                      f"{s.name}.optimizer": s.optimizer, f"{s.name}.rng": s.rng}
        return parts

    def optimizers(self) -> dict[str, ScheduledAdamW]:
        return {s.name: s.optimizer for s in self.mine if s.optimizer is not None}

    def last_step(self) -> int:
        return self.config.train.steps

    def values_at(self, step: int) -> StepValues:
        cfg = self.config
        optimizers = {}
        for s in self.mine:
            assert s.lr is not None and s.weight_decay is not None
            frozen = step < s.optim.freeze_last_layer_steps
            optimizers[s.name] = OptimizerValues(s.lr.at(step) * s.lr_scale, s.weight_decay.at(step),
                                                 0.0 if frozen else 1.0)
        total = cfg.train.steps
        scalars = {"teacher_temp": cfg.loss.teacher_temp.at(step, total), "momentum": cfg.ema.momentum.at(step, total),
                   "local_weight": cfg.loss.local_weight.at(step, total)}
        return StepValues(optimizers, scalars)

    # ------------------------------------------------------------------ one step

    def teacher_targets(self, batch: CropBatch, temp: float) -> tuple[CropBatch, TeacherTargets]:
        """The teacher on this rank's slice, once; then this rank's chunk of the global batch and its
        Sinkhorn-Knopp targets (DINO and iBOT), balanced over the chunk's student group."""
        rt, cfg, teacher = self.runtime, self.config, self.teacher.module
        n_local = batch.n_local if batch.local_crops.numel() else 0
        with rt.section("teacher"), torch.no_grad(), rt.autocast():
            tokens = teacher.backbone.forward_group(batch.global_crops)
            dino = teacher.dino_head.bottleneck(tokens["cls"])
            mask_index = batch.masks.flatten().nonzero().squeeze(1)
            ibot = teacher.ibot_head.bottleneck(tokens["patches"].flatten(0, 1).index_select(0, mask_index))
        group = None
        if rt.env.enabled:
            index, count = self.chunk
            group = next(s.group for s in self.mine)
            ibot, n_masked = gather_masked(ibot, batch.masks, N_GLOBAL, index, count)
            masks = gather_crop_major(batch.masks.to(torch.uint8), N_GLOBAL).bool()
            batch = CropBatch(
                chunk_rows(gather_crop_major(batch.global_crops, N_GLOBAL), N_GLOBAL, index, count),
                chunk_rows(gather_crop_major(batch.local_crops, n_local), n_local, index, count) if n_local
                else batch.local_crops, None, chunk_rows(masks, N_GLOBAL, index, count),
                batch.batch_size * rt.env.world_size // count)
            dino = chunk_rows(gather_crop_major(dino, N_GLOBAL), N_GLOBAL, index, count)
        else:
            n_masked = torch.tensor(float(mask_index.numel()), device=rt.device)
        with rt.section("losses"), torch.no_grad():
            dino_targets = sinkhorn_knopp(teacher.dino_head.last_layer(dino), temp, cfg.loss.sinkhorn_iters,
                                          group=group).view(N_GLOBAL, batch.batch_size, -1)
            ibot_targets = None
            if float(n_masked) > 0:
                ibot_targets = sinkhorn_knopp(teacher.ibot_head.last_layer(ibot), temp, cfg.loss.sinkhorn_iters,
                                              n_samples_total=n_masked, group=group)
        return batch, TeacherTargets(dino_targets, ibot_targets, None)

    def student_losses(self, student: Student, batch: CropBatch, targets: TeacherTargets,
                       values: StepValues) -> tuple[Tensor, dict[str, float]]:
        rt, cfg = self.runtime, self.config
        n_local = batch.n_local if batch.local_crops.numel() else 0
        mask_index = batch.masks.flatten().nonzero().squeeze(1)
        assert student.forward is not None
        with student.rng.active(rt.device), rt.section(f"student_forward.{student.name}"), rt.autocast():
            out = student.forward(batch.global_crops, batch.local_crops, None, mask_index)  # unmasked input
        with rt.section("losses"):
            terms = ssl_terms(out, targets, batch.masks, batch.batch_size, n_local, cfg.loss.student_temp, koleo_loss)
            weights = LossWeights(dino=cfg.loss.dino_weight, local=values.scalars["local_weight"],
                                  koleo=cfg.loss.koleo_weight, ibot=cfg.loss.ibot_weight, gram=0.0,
                                  n_global=N_GLOBAL, n_local=n_local)
            return combine_losses(terms, weights)

    def forward_backward(self, batch: CropBatch, values: StepValues) -> tuple[Tensor, dict[str, float]]:
        rt = self.runtime
        chunk, targets = self.teacher_targets(batch.to(rt.device), values.scalars["teacher_temp"])
        losses: dict[str, Tensor] = {}
        logs: dict[str, float] = {}
        for student in self.mine:  # on one process: in turns, each freeing its graph before the next
            loss, student_logs = self.student_losses(student, chunk, targets, values)
            logs |= {f"{student.name}.{k}": v for k, v in student_logs.items() if k in TERMS}
            if rt.env.enabled:
                losses[student.name] = loss
            elif math.isfinite(student_logs["total"]):
                with rt.section(f"backward.{student.name}"):
                    loss.backward()
        logs = self._all_students_logs(logs)
        logs["total"] = sum(logs[f"{s.name}.total"] for s in self.students)
        if rt.env.enabled and math.isfinite(logs["total"]):  # one decision on every rank, then backward
            for name, loss in losses.items():
                with rt.section(f"backward.{name}"):
                    loss.backward()
        return torch.tensor(logs["total"]), logs

    def _all_students_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """Every student's logged terms on every rank (the mean over the ranks of its group)."""
        if not self.runtime.env.enabled:
            return logs
        keys = [f"{s.name}.{term}" for s in self.students for term in TERMS]
        sums = torch.tensor([[logs.get(k, 0.0), float(k in logs)] for k in keys], dtype=torch.float64)
        sums = distributed.all_reduce_sum(sums.to(self.runtime.device)).cpu()
        return {k: float(total / count) for k, (total, count) in zip(keys, sums.tolist()) if count > 0}

    def after_optimizer_step(self, step: int, values: StepValues) -> None:
        for student in self.mine:
            assert student.ema is not None and student.model is not None
            student.ema.update(student.model, values.scalars["momentum"])

    # ------------------------------------------------------------------ export

    def export(self, directory: Path, step: int, metrics: Mapping[str, float],
               manifest: Mapping[str, Any]) -> dict[str, Any] | None:
        """Each student's EMA copy as a Model artifact under students/<name>/ (written by the first
        rank of its group), then, on the main rank, the summary manifest of the stage's output."""
        env = self.runtime.env
        record = dict(manifest)
        inputs = list(record.pop("inputs", []))
        for student in self.mine:
            if student.ranks[0] != env.rank:
                continue
            assert student.ema is not None
            own = {k.split(".", 1)[1]: v for k, v in metrics.items() if k.startswith(f"final_{student.name}.")}
            ema = student.ema.model
            out = directory / STUDENTS_DIR / student.name
            out.mkdir(parents=True, exist_ok=True)
            write_model_artifact(out, ema.backbone, ema.heads(), student.backbone, student.dino_config(self.config),
                                 "distill", step, {f"final_{k}": v for k, v in own.items()}, inputs=inputs,
                                 distill={"student": student.name, "of": str(directory)})
        distributed.barrier()
        if not env.is_main:
            return None
        summary = build_manifest("Model", "distill", config=dump_config(self.config), inputs=inputs,
                                 counts={"step": step, "students": len(self.students)}, metrics=dict(metrics),
                                 step=step, students={s.name: f"{STUDENTS_DIR}/{s.name}" for s in self.students},
                                 student_ranks={s.name: list(s.ranks) for s in self.students}, **record)
        write_manifest(directory, summary)
        return summary


def _param_count(student: Student) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in DinoModel(student.backbone, student.heads).parameters())
