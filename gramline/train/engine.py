"""The SSL training engine shared by pretrain, gram and highres (reference §1-§8).

Student (backbone + DINO + iBOT heads) trained with AdamW; EMA teacher of all of it; Sinkhorn-
Knopp teacher targets; DINO (local + global), iBOT, KoLeo and, when a Gram teacher is given, the
Gram loss. Schedules for LR, WD, momentum, teacher temperature and loss weights; layer-wise LR
decay; per-module gradient clipping; last-layer freeze; bf16 autocast on CUDA; DDP or FSDP2 under
torchrun; atomic, complete checkpoints that resume exactly; an abort on repeated NaN losses.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gramline.config import SSLConfig
from gramline.data.collate import CropBatch
from gramline.losses.dino import dino_loss
from gramline.losses.gram import gram_loss
from gramline.losses.ibot import ibot_loss, ibot_mask_weights
from gramline.losses.koleo import koleo_loss, koleo_loss_distributed
from gramline.losses.sinkhorn import sinkhorn_knopp
from gramline.losses.total import LossWeights, combine_losses
from gramline.train import distributed
from gramline.train.checkpoint import (latest_checkpoint, load_checkpoint, rng_state, save_checkpoint,
                                       set_rng_state)
from gramline.train.distributed import DistEnv
from gramline.train.ema import update_ema
from gramline.train.model import SSLModel
from gramline.train.param_groups import build_param_groups, scaled_lr
from gramline.train.progress import ProgressLog

N_GLOBAL = 2


class TrainingDiverged(RuntimeError):
    """Raised after more than `train.max_nan_steps` consecutive non-finite losses."""


@dataclass
class StepValues:
    lr: float
    wd: float
    momentum: float
    teacher_temp: float
    local_weight: float
    gram_weight: float
    last_layer_lr_factor: float


@dataclass
class Hooks:
    """Extension points for later phases (Gram teacher refresh, resolution mixture, ...)."""

    after_step: list[Callable[["SSLTrainer", int], None]] = field(default_factory=list)
    on_teacher_checkpoint: list[Callable[["SSLTrainer", int, Path], None]] = field(default_factory=list)


class GramTeacher(nn.Module):
    """A frozen backbone whose patch tokens anchor the student's Gram matrices (reference §1.5)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)

    @torch.no_grad()
    def patch_grid(self, images: Tensor, out_grid: tuple[int, int], antialias: bool = False) -> Tensor:
        tokens = self.backbone.forward_group(images)["patches"]  # [B, n*n, D]
        batch, count, dim = tokens.shape
        side = int(math.isqrt(count))
        grid = tokens.transpose(1, 2).reshape(batch, dim, side, side)
        if (side, side) != tuple(out_grid):
            grid = F.interpolate(grid.float(), size=out_grid, mode="bicubic", align_corners=False,
                                 antialias=antialias)
        return grid.flatten(2).transpose(1, 2)

    def train(self, mode: bool = True) -> "GramTeacher":  # always frozen, always eval
        return super().train(False)


class SSLTrainer:
    def __init__(self, config: SSLConfig, out_dir: Path, batches: Callable[[int], Iterator[CropBatch]],
                 env: DistEnv, init_student: dict[str, Tensor] | None = None,
                 gram_teacher: nn.Module | None = None, hooks: Hooks | None = None,
                 stage: str = "pretrain", log: bool = True) -> None:
        """`batches(start_step)` yields this rank's batches from that step on (the data position)."""
        self.config = config
        self.out_dir = Path(out_dir)
        self.batches = batches
        self.env = env
        self.device = env.device
        self.stage = stage
        self.hooks = hooks or Hooks()
        self.log_enabled = log and env.is_main
        torch.manual_seed(config.train.seed)
        self.student = SSLModel(config).to(self.device)
        if init_student is not None:
            self.student.load_state_dict(init_student)
        self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.gram_teacher = GramTeacher(gram_teacher).to(self.device) if gram_teacher is not None else None
        self.global_batch = config.train.batch_size * env.world_size
        self.base_lr_scale = scaled_lr(1.0, config.optim.lr_scaling, self.global_batch)
        self.depth = len(self.student.backbone.vit.blocks)
        groups = build_param_groups(self.student.backbone, self.student.heads(), self.depth,
                                    config.optim.layerwise_decay, config.optim.patch_embed_lr_mult)
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(config.optim.betas), fused=fused,
                                           foreach=None if fused else True)
        self.forward_student: nn.Module = self._parallelize()
        self.step = 0
        self.nan_streak = 0
        self.autocast_dtype = self._autocast_dtype()
        self.state_dir = self.out_dir / "state"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.last_log: dict[str, float] = {}
        self.extra_state: dict[str, Any] = {}
        # keys of the step log shown in progress lines and metrics.jsonl (later phases add theirs)
        self.log_keys: list[str] = ["total", "dino_local", "dino_global", "ibot", "koleo", "gram", "lr"]
        self.section_times: dict[str, float] | None = None  # set to {} to time step sections (bench/)

    # ------------------------------------------------------------------ setup

    def _autocast_dtype(self) -> torch.dtype | None:
        precision = self.config.train.precision
        if precision == "bf16" or (precision == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    def _parallelize(self) -> nn.Module:
        mode = self.config.train.distributed
        if self.config.train.compile:
            for block in self.student.backbone.vit.blocks:
                block.compile()
            for head in self.student.heads().values():
                head.compile()
        if not self.env.enabled:
            return self.student
        if mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for model in (self.student, self.teacher):
                for block in model.backbone.vit.blocks:
                    fully_shard(block)
                fully_shard(model)
            return self.student
        return nn.parallel.DistributedDataParallel(
            self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            broadcast_buffers=False)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Accumulate wall time per step section when `section_times` is a dict (benchmarks only)."""
        if self.section_times is None:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.section_times[name] = self.section_times.get(name, 0.0) + time.perf_counter() - start

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ schedules

    def values_at(self, step: int) -> StepValues:
        cfg, total = self.config, self.config.train.steps
        frozen = step < cfg.optim.freeze_last_layer_steps
        return StepValues(
            lr=cfg.optim.lr.at(step, total) * self.base_lr_scale,
            wd=cfg.optim.weight_decay.at(step, total),
            momentum=cfg.ema.momentum.at(step, total),
            teacher_temp=cfg.loss.teacher_temp.at(step, total),
            local_weight=cfg.loss.local_weight.at(step, total),
            gram_weight=cfg.gram.weight.at(step, total) if self.gram_teacher is not None else 0.0,
            last_layer_lr_factor=0.0 if frozen else 1.0,
        )

    def _apply_optimizer_values(self, values: StepValues) -> None:
        for group in self.optimizer.param_groups:
            factor = values.last_layer_lr_factor if group["is_last_layer"] else 1.0
            group["lr"] = values.lr * group["lr_mult"] * factor
            group["weight_decay"] = values.wd * group["wd_mult"]

    # ------------------------------------------------------------------ one step

    def compute_losses(self, batch: CropBatch, values: StepValues) -> tuple[Tensor, dict[str, float]]:
        cfg = self.config
        bsz = batch.batch_size
        n_local = batch.local_crops.shape[0] // bsz if batch.local_crops.numel() else 0
        masks = batch.masks
        mask_index = masks.flatten().nonzero().squeeze(1)
        n_masked = torch.tensor([float(mask_index.numel())], device=self.device)
        n_masked_total = distributed.all_reduce_mean(n_masked) * self.env.world_size

        with self.section("teacher"), torch.no_grad(), self.autocast():
            t_out = self.teacher(batch.global_crops, None, None, mask_index)
        with self.section("losses"):
            teacher_dino = sinkhorn_knopp(t_out["dino_global"], values.teacher_temp, cfg.loss.sinkhorn_iters)
            teacher_dino = teacher_dino.view(N_GLOBAL, bsz, -1)

        gram_target = None
        if self.gram_teacher is not None and batch.gram_crops is not None:
            side = batch.global_crops.shape[-1] // self.student.backbone.patch_size
            with self.section("gram_teacher"), torch.no_grad(), self.autocast():
                gram_target = self.gram_teacher.patch_grid(batch.gram_crops, (side, side), cfg.gram.resize_antialias)

        with self.section("student_forward"), self.autocast():
            s_out = self.forward_student(batch.global_crops, batch.local_crops, masks, mask_index)

        with self.section("losses"):
            return self._loss_terms(batch, values, s_out, t_out, teacher_dino, gram_target, n_masked_total, n_local)

    def _loss_terms(self, batch: CropBatch, values: StepValues, s_out: dict, t_out: dict, teacher_dino: Tensor,
                    gram_target: Tensor | None, n_masked_total: Tensor,
                    n_local: int) -> tuple[Tensor, dict[str, float]]:
        cfg = self.config
        bsz = batch.batch_size
        masks = batch.masks
        terms: dict[str, Tensor] = {}
        temp = cfg.loss.student_temp
        if n_local:
            terms["dino_local"] = dino_loss(s_out["dino_local"].float().view(n_local, bsz, -1), teacher_dino, temp)
        terms["dino_global"] = dino_loss(s_out["dino_global"].float().view(N_GLOBAL, bsz, -1), teacher_dino, temp,
                                         ignore_diagonal=True)
        if float(n_masked_total.item()) > 0:
            teacher_ibot = sinkhorn_knopp(t_out["ibot"], values.teacher_temp, cfg.loss.sinkhorn_iters,
                                          n_samples_total=n_masked_total)
            weights = ibot_mask_weights(masks)
            terms["ibot"] = ibot_loss(s_out["ibot"].float(), teacher_ibot, weights, n_crops=N_GLOBAL * bsz,
                                      student_temp=temp)
        cls = s_out["global_cls"].float().view(N_GLOBAL, bsz, -1)
        koleo_fn = self._koleo_fn()
        terms["koleo"] = torch.stack([koleo_fn(cls[i]) for i in range(N_GLOBAL)])
        if gram_target is not None:
            terms["gram"] = gram_loss(s_out["global_patches"].float(), gram_target.float(), cfg.gram.normalize,
                                      cfg.gram.img_level, cfg.gram.remove_neg, cfg.gram.remove_only_teacher_neg)
        weights_now = LossWeights(dino=cfg.loss.dino_weight, local=values.local_weight, koleo=cfg.loss.koleo_weight,
                                  ibot=cfg.loss.ibot_weight, gram=values.gram_weight, n_global=N_GLOBAL,
                                  n_local=n_local)
        return combine_losses(terms, weights_now)

    def _koleo_fn(self) -> Callable[[Tensor], Tensor]:
        group = self.extra_state.get("koleo_group_size")
        if group:
            return lambda x: koleo_loss_distributed(x, int(group))
        return koleo_loss

    def clip_gradients(self) -> dict[str, float]:
        clip = self.config.optim.clip_grad
        norms = {}
        if clip <= 0:
            return norms
        for name, module in (("backbone", self.student.backbone), *self.student.heads().items()):
            params = [p for p in module.parameters() if p.grad is not None]
            if params:
                norms[f"grad_norm_{name}"] = nn.utils.clip_grad_norm_(params, clip)
        return norms

    def train_step(self, batch: CropBatch) -> dict[str, float] | None:
        """One optimisation step; returns the log values, or None when the step was skipped (NaN)."""
        values = self.values_at(self.step)
        self._apply_optimizer_values(values)
        batch = batch.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss, log = self.compute_losses(batch, values)
        if not math.isfinite(log["total"]):
            self.nan_streak += 1
            if self.nan_streak > self.config.train.max_nan_steps:
                raise TrainingDiverged(f"loss was not finite for {self.nan_streak} consecutive steps "
                                       f"(last at step {self.step}); lower optim.lr or check the data")
            return None
        self.nan_streak = 0
        with self.section("backward"):
            loss.backward()
        with self.section("optimizer"):
            self.clip_gradients()
            self.optimizer.step()
            update_ema(self.teacher, self.student, values.momentum)
        return {**log, "lr": values.lr, "wd": values.wd, "momentum": values.momentum,
                "teacher_temp": values.teacher_temp, "gram_weight": values.gram_weight,
                "local_weight": values.local_weight}

    # ------------------------------------------------------------------ checkpoints

    def model_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, \
            get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {
            "student": get_model_state_dict(self.student, options=options),
            "teacher": get_model_state_dict(self.teacher, options=options),
            "optimizer": get_optimizer_state_dict(self.student, self.optimizer, options=options),
            "gram_teacher": self.gram_teacher.backbone.state_dict() if self.gram_teacher is not None else None,
            "step": self.step,
            "extra": self.extra_state,
        }

    def rank_state(self) -> dict[str, Any]:
        return {"step": self.step, "rng": rng_state(), "nan_streak": self.nan_streak}

    def save(self) -> Path:
        state = self.model_state()
        return save_checkpoint(self.state_dir, self.step, state if self.env.is_main else None, self.rank_state(),
                               self.env.rank, self.config.train.keep_checkpoints,
                               meta={"step": self.step, "config": self.extra_state.get("config")})

    def try_resume(self, state_dir: Path | None = None) -> bool:
        """Load the latest complete checkpoint of `state_dir` (default: this run's own); a later
        phase passes the state directory of the run it continues."""
        path = latest_checkpoint(state_dir or self.state_dir)
        if path is None:
            return False
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, \
            set_optimizer_state_dict

        model_state, rank_state = load_checkpoint(path, self.env.rank)
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.student, model_state["student"], options=options)
        set_model_state_dict(self.teacher, model_state["teacher"], options=options)
        set_optimizer_state_dict(self.student, self.optimizer, model_state["optimizer"], options=options)
        if self.gram_teacher is not None and model_state.get("gram_teacher") is not None:
            self.gram_teacher.backbone.load_state_dict(model_state["gram_teacher"])
        self.step = int(model_state["step"])
        self.extra_state = dict(model_state.get("extra") or {})
        self.nan_streak = int(rank_state["nan_streak"])
        set_rng_state(rank_state["rng"])
        self._truncate_metrics(self.step)
        if self.log_enabled:
            print(f"[{self.stage}] resumed from {path} at step {self.step}", flush=True)
        return True

    def _truncate_metrics(self, step: int) -> None:
        import json

        if not self.env.is_main or not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------ loop

    def fit(self, on_teacher_checkpoint: Callable[[int], None] | None = None) -> dict[str, float]:
        cfg = self.config.train
        self.out_dir.mkdir(parents=True, exist_ok=True)
        progress = ProgressLog(cfg.steps, self.global_batch, self.metrics_path, enabled=self.log_enabled,
                               prefix=self.stage)
        iterator = iter(self.batches(self.step))
        self.student.train()
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            batch = next(iterator)
            data_seconds = time.perf_counter() - t0
            log = self.train_step(batch)
            self.step += 1
            progress.add_step(data_seconds)
            if log is not None:
                self.last_log = log
            for hook in self.hooks.after_step:
                hook(self, self.step)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                shown = {k: self.last_log[k] for k in self.log_keys if k in self.last_log}
                progress.emit(self.step, shown)
            if cfg.teacher_checkpoint_every and self.step % cfg.teacher_checkpoint_every == 0 and on_teacher_checkpoint:
                on_teacher_checkpoint(self.step)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save()
        return self.last_log
