"""The DINO recipe: DINO (local + global) + iBOT + KoLeo, and the Gram term when `gram.enabled`.

The student (backbone + DINO and iBOT heads) trains with AdamW; an EMA teacher of all of it gives
the Sinkhorn-Knopp targets; the Gram teacher (a frozen anchor, refreshed at configured steps, or
the EMA teacher's own backbone) gives the Gram targets. All teacher targets are computed in one
place (`teacher_targets`) before the student forward. Pretrain, gram and highres differ only by
configuration (gramline.train.recipes.dino.config). DINOv3 paper §3-4; official
`dinov3/train/ssl_meta_arch.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gramline.data.collate import CropBatch
from gramline.errors import InputError
from gramline.losses.dino import dino_loss
from gramline.losses.gram import gram_loss
from gramline.losses.ibot import ibot_loss, ibot_mask_weights
from gramline.losses.koleo import koleo_loss, koleo_loss_distributed
from gramline.losses.sinkhorn import sinkhorn_knopp
from gramline.losses.total import LossWeights, combine_losses
from gramline.train import distributed
from gramline.train.checkpoint import Stateful
from gramline.train.export import write_model_artifact
from gramline.train.optimizer import ScheduledAdamW
from gramline.train.param_groups import build_param_groups, scaled_lr
from gramline.train.recipe import StepValues
from gramline.train.recipes.dino.config import DinoConfig, GramStageConfig
from gramline.train.recipes.dino.model import DinoModel, DinoOutput
from gramline.train.recipes.dino.schedules import DinoSchedules, PhaseStart
from gramline.train.runtime import Runtime
from gramline.train.teachers import EmaTeacher, FrozenTeacher, ModulePart, unsharded_copy, update_ema

N_GLOBAL = 2
LOSS_NAMES = ("dino_local", "dino_global", "ibot", "koleo", "gram")


@torch.no_grad()
def gram_targets(backbone: nn.Module, images: Tensor, out_grid: tuple[int, int], antialias: bool = False) -> Tensor:
    """The Gram teacher's patch tokens for `images`, resized bicubically to the student's grid."""
    tokens = backbone.forward_group(images)["patches"]  # [B, n*n, D]
    batch, count, dim = tokens.shape
    side = math.isqrt(count)
    grid = tokens.transpose(1, 2).reshape(batch, dim, side, side)
    if (side, side) != tuple(out_grid):
        grid = F.interpolate(grid.float(), size=out_grid, mode="bicubic", align_corners=False, antialias=antialias)
    return grid.flatten(2).transpose(1, 2)


@dataclass
class TeacherTargets:
    dino: Tensor  # [n_g, B, K] Sinkhorn-Knopp targets of the global crops
    ibot: Tensor | None  # [M, K_ibot] at the masked positions (None: nothing masked anywhere)
    gram: Tensor | None  # [n_g*B, N, D] Gram teacher patches on the student's grid


def ssl_terms(out: DinoOutput, targets: TeacherTargets, masks: Tensor, batch_size: int, n_local: int,
              student_temp: float, koleo: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """The DINO (local, global), iBOT and KoLeo terms of a student's outputs against the targets;
    shared by the DINO and distillation recipes."""
    bsz, terms = batch_size, {}
    if n_local:
        terms["dino_local"] = dino_loss(out["dino_local"].float().view(n_local, bsz, -1), targets.dino, student_temp)
    terms["dino_global"] = dino_loss(out["dino_global"].float().view(N_GLOBAL, bsz, -1), targets.dino, student_temp,
                                     ignore_diagonal=True)
    if targets.ibot is not None:
        terms["ibot"] = ibot_loss(out["ibot"].float(), targets.ibot, ibot_mask_weights(masks),
                                  n_crops=N_GLOBAL * bsz, student_temp=student_temp)
    cls = out["global_cls"].float().view(N_GLOBAL, bsz, -1)
    terms["koleo"] = torch.stack([koleo(cls[i]) for i in range(N_GLOBAL)])
    return terms


def upgrade_first_layout(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of gramline 0.1 (student, teacher, optimizer, gram_teacher, step, extra) in the
    current layout (the Gram teacher's refreshes and the phase start moved out of `extra`)."""
    extra = state.get("extra") or {}
    out: dict[str, Any] = {"layout": 2, "step": int(state["step"]),
                           **{name: state[name] for name in ("student", "teacher", "optimizer")}}
    if state.get("gram_teacher") is not None:
        out["gram_teacher"] = {"weights": state["gram_teacher"], "refreshes": list(extra.get("gram_refreshes", []))}
    continued = extra.get("continued_from") or {}
    out["phase"] = {"start_step": int(continued.get("step", 0)), "continued_from": continued.get("path")}
    return out


class DinoRecipe:
    """`gram_anchor`: the frozen Gram teacher's backbone (gram: the anchor; highres: the starting
    teacher; pretrain from existing weights: the starting backbone), refreshed from the EMA teacher's
    backbone after the phase steps `phase.refresh_at` (gram); `init_student`: weights the student and
    its EMA teacher start from (highres: all of them; pretrain --init-from: the backbone, and the mask
    token and heads when the source has them)."""

    loss_names = LOSS_NAMES
    upgrade = staticmethod(upgrade_first_layout)

    def __init__(self, config: DinoConfig, stage: str, gram_anchor: nn.Module | None = None,
                 init_student: Mapping[str, Tensor] | None = None, log: bool = True) -> None:
        self.config = config
        self.name = stage
        self.log = log
        self.gram_from_ema = isinstance(config, GramStageConfig) and config.phase.ema_teacher
        if config.gram.enabled and gram_anchor is None and not self.gram_from_ema:
            raise InputError("config field 'gram.enabled'", f"is true, but the {stage} stage has no Gram teacher",
                             "the gram stage (an anchor, or phase.ema_teacher), the highres stage, or pretrain "
                             "with --init-from (anchored to the starting backbone)")
        self._gram_anchor = gram_anchor if config.gram.enabled else None
        self._refresh_at = frozenset(config.phase.refresh_at) if isinstance(config, GramStageConfig) else frozenset()
        self._init_student = init_student
        self.phase = PhaseStart()
        self._schedules: tuple[int, DinoSchedules] | None = None
        keys = ["total", *LOSS_NAMES, "lr"]
        self.progress_keys = keys + (["gram_weight", "local_weight"] if config.gram.enabled else [])

    # ------------------------------------------------------------------ building

    def build(self, runtime: Runtime) -> None:
        cfg, device = self.config, runtime.device
        self.runtime = runtime
        self.student = DinoModel(cfg.backbone, cfg.heads).to(device)
        if self._init_student is not None:
            # a starting backbone may come without mask token and heads (they keep their fresh init)
            missing, unexpected = self.student.load_state_dict(self._init_student, strict=False)
            loose = [k for k in missing if not k.startswith(("dino_head.", "ibot_head.", "backbone.mask_token"))]
            if unexpected or loose:
                raise RuntimeError(f"starting weights do not cover the backbone: missing {loose[:3]}, "
                                   f"unexpected {unexpected[:3]}")
            self._init_student = None
        self.student.backbone.activation_checkpointing = cfg.train.activation_checkpointing
        self.teacher = EmaTeacher(self.student)
        self.gram_teacher = None
        dtype = distributed.param_dtype(runtime.env, runtime.autocast_dtype)
        if self._gram_anchor is not None:
            self.gram_teacher = FrozenTeacher(self._gram_anchor, self._is_refresh_step)
            if cfg.train.distributed == "fsdp" and runtime.env.enabled:  # before the move: only shards go to the GPU
                distributed.shard(self.gram_teacher.module, dtype, inference=True)
            self.gram_teacher.to(device)
        self.forward_student = distributed.parallelize(self.student, runtime.env, cfg.train.distributed,
                                                       cfg.train.compile, also_shard=[self.teacher.model], dtype=dtype)
        self.global_batch = cfg.train.batch_size * runtime.env.world_size
        self.lr_scale = scaled_lr(1.0, cfg.optim.lr_scaling, self.global_batch)
        # after sharding: FSDP2 replaces the parameters by their shards, which the optimizer must hold
        groups = build_param_groups(self.student.backbone, self.student.heads(), len(self.student.backbone.vit.blocks),
                                    cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult,
                                    separate_backbone=cfg.init.head_warmup_steps > 0)
        self.optimizer = ScheduledAdamW(self.student, groups, cfg.optim.betas, cfg.optim.clip_grad,
                                        {"backbone": self.student.backbone, **self.student.heads()}, device)
        self.student.train()

    @property
    def gram_backbone(self) -> nn.Module | None:
        """The module whose patch tokens the Gram term matches (None when the term is off)."""
        if self.gram_from_ema and self.config.gram.enabled:
            return self.teacher.model.backbone
        return self.gram_teacher.module if self.gram_teacher is not None else None

    def parts(self) -> dict[str, Stateful]:
        parts: dict[str, Stateful] = {"student": ModulePart(self.student), "teacher": self.teacher,
                                      "optimizer": self.optimizer, "phase": self.phase}
        if self.gram_teacher is not None:
            parts["gram_teacher"] = self.gram_teacher
        return parts

    def optimizers(self) -> dict[str, ScheduledAdamW]:
        return {"optimizer": self.optimizer}

    def _is_refresh_step(self, step: int) -> bool:
        return step - self.phase.start_step in self._refresh_at

    def begin_phase(self, start_step: int, continued_from: Path) -> None:
        """A continuing stage took the run over at `start_step` (its phase counts from there)."""
        self.phase.start_step, self.phase.continued_from = start_step, str(continued_from)

    # ------------------------------------------------------------------ schedules

    def schedules(self) -> DinoSchedules:
        """The per-step values, read once the phase start is known (rebuilt only if it changes)."""
        if self._schedules is None or self._schedules[0] != self.phase.start_step:
            self._schedules = (self.phase.start_step, DinoSchedules.of(self.config, self.phase.start_step))
        return self._schedules[1]

    def last_step(self) -> int:
        return self.schedules().last_step

    def values_at(self, step: int) -> StepValues:
        return self.schedules().at(step, self.lr_scale)

    # ------------------------------------------------------------------ one step

    def teacher_targets(self, batch: CropBatch, values: StepValues, mask_index: Tensor,
                        n_masked_total: Tensor) -> TeacherTargets:
        """Every target of this step: EMA teacher → Sinkhorn-Knopp (DINO, iBOT); Gram teacher patches."""
        cfg, rt = self.config, self.runtime
        temp = values.scalars["teacher_temp"]
        with rt.section("teacher"), torch.no_grad(), rt.autocast():
            out = self.teacher.model(batch.global_crops, None, None, mask_index)
        with rt.section("losses"):
            dino = sinkhorn_knopp(out["dino_global"], temp, cfg.loss.sinkhorn_iters).view(N_GLOBAL, batch.batch_size, -1)
            ibot = None
            if float(n_masked_total.item()) > 0:
                ibot = sinkhorn_knopp(out["ibot"], temp, cfg.loss.sinkhorn_iters, n_samples_total=n_masked_total)
        gram = None
        backbone = self.gram_backbone
        if backbone is not None and batch.gram_crops is not None:
            side = batch.global_crops.shape[-1] // self.student.backbone.patch_size
            with rt.section("gram_teacher"), torch.no_grad(), rt.autocast():
                gram = gram_targets(backbone, batch.gram_crops, (side, side), cfg.gram.resize_antialias)
        return TeacherTargets(dino, ibot, gram)

    def compute_losses(self, batch: CropBatch, values: StepValues) -> tuple[Tensor, dict[str, float]]:
        rt = self.runtime
        mask_index = batch.masks.flatten().nonzero().squeeze(1)
        n_masked = torch.tensor([float(mask_index.numel())], device=rt.device)
        n_masked_total = distributed.all_reduce_mean(n_masked) * rt.env.world_size
        targets = self.teacher_targets(batch, values, mask_index, n_masked_total)
        with rt.section("student_forward"), rt.autocast():
            out = self.forward_student(batch.global_crops, batch.local_crops, batch.masks, mask_index)
        with rt.section("losses"):
            return self.loss_terms(batch, values, out, targets)

    def loss_terms(self, batch: CropBatch, values: StepValues, out: DinoOutput,
                   targets: TeacherTargets) -> tuple[Tensor, dict[str, float]]:
        cfg = self.config
        n_local = batch.n_local if batch.local_crops.numel() else 0
        terms = ssl_terms(out, targets, batch.masks, batch.batch_size, n_local, cfg.loss.student_temp, self._koleo())
        if targets.gram is not None:
            g = cfg.gram
            terms["gram"] = gram_loss(out["global_patches"].float(), targets.gram.float(), g.normalize, g.img_level,
                                      g.remove_neg, g.remove_only_teacher_neg)
        weights = LossWeights(dino=cfg.loss.dino_weight, local=values.scalars["local_weight"],
                              koleo=cfg.loss.koleo_weight, ibot=cfg.loss.ibot_weight,
                              gram=values.scalars["gram_weight"], n_global=N_GLOBAL, n_local=n_local)
        return combine_losses(terms, weights)

    def _koleo(self) -> Callable[[Tensor], Tensor]:
        group = self.config.loss.koleo_group_size
        if group:
            return lambda x: koleo_loss_distributed(x, int(group))
        return koleo_loss

    def forward_backward(self, batch: CropBatch, values: StepValues) -> tuple[Tensor, dict[str, float]]:
        loss, logs = self.compute_losses(batch.to(self.runtime.device), values)
        if math.isfinite(logs["total"]):
            with self.runtime.section("backward"):
                loss.backward()
        return loss, logs

    def after_optimizer_step(self, step: int, values: StepValues) -> None:
        momentum = values.scalars["momentum"]
        if values.scalars.get("backbone_frozen"):  # head warm-up: the EMA backbone stays exactly as loaded
            teacher_heads = self.teacher.model.heads()
            for name, head in self.student.heads().items():
                update_ema(teacher_heads[name], head, momentum)
        else:
            self.teacher.update(self.student, momentum)
        gram = self.gram_teacher
        if gram is not None and gram.maybe_refresh(step, self._ema_backbone_weights) and self.log \
                and self.runtime.env.is_main:
            print(f"[{self.name}] step {step}: Gram teacher refreshed from the EMA teacher "
                  f"(refresh {len(gram.refreshes)})", flush=True)

    def _ema_backbone_weights(self) -> dict[str, Tensor]:
        """The EMA backbone's state dict: plain tensors, or under FSDP2 shards laid out as the Gram
        teacher's (both are sharded over the world), so each rank copies only its own shard."""
        return self.teacher.model.backbone.state_dict()

    # ------------------------------------------------------------------ export

    def export(self, directory: Path, step: int, metrics: Mapping[str, float],
               manifest: Mapping[str, Any]) -> dict[str, Any] | None:
        """The EMA teacher as a Model artifact, written by the main rank (under FSDP2 every rank
        first gathers the full weights with it)."""
        teacher = self.teacher.model
        if distributed.is_sharded(teacher):
            teacher = unsharded_copy(teacher, lambda: DinoModel(self.config.backbone, self.config.heads))
        if not self.runtime.env.is_main:
            return None
        return write_model_artifact(directory, teacher.backbone, teacher.heads(), self.config.backbone, self.config,
                                    self.name, step, metrics, **dict(manifest))
