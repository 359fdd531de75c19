"""The one training loop: steps, data position, NaN guard, callbacks, progress and checkpoints.

It knows no recipe word. `batches(start_step)` yields the batches of this rank from `start_step` on,
so a resumed run sees exactly the batches an uninterrupted run would have seen; together with the
parts, the RNG states and the NaN streak in every checkpoint, a run killed at any moment and started
again ends bit-equal to an uninterrupted one. The recipe protocol is in gramline.train.recipe.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gramline.errors import InputError
from gramline.train.checkpoint import Checkpointer, latest_checkpoint, rng_state, set_rng_state
from gramline.train.config import LoggersConfig, TrainConfig
from gramline.train.distributed import DistEnv
from gramline.train.loggers import open_sinks
from gramline.train.metrics import MetricsLog, truncate_metrics
from gramline.train.recipe import Recipe
from gramline.train.runtime import Runtime

METRICS_FILE = "metrics.jsonl"
StepCallback = Callable[[int], None]


class TrainingDiverged(RuntimeError):
    """Raised after more than `max_nan_steps` consecutive non-finite losses."""


@dataclass(frozen=True)
class LoopSettings:
    seed: int = 0
    precision: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    max_nan_steps: int = 2
    loggers: LoggersConfig | None = None  # None: metrics.jsonl only

    @classmethod
    def of(cls, train: TrainConfig) -> LoopSettings:
        return cls(train.seed, train.precision, train.log_every, train.checkpoint_every, train.keep_checkpoints,
                   train.max_nan_steps, train.loggers)


class TrainLoop:
    def __init__(self, recipe: Recipe, batches: Callable[[int], Iterator[Any]], env: DistEnv, out_dir: Path,
                 settings: LoopSettings, images_per_step: int, meta: Mapping[str, Any] | None = None,
                 callbacks: Sequence[StepCallback] = (), log: bool = True) -> None:
        """Seeds torch with `settings.seed`, then builds the recipe. `meta` goes into each checkpoint's
        meta.json (the run's config); `callbacks` run after every step with the step count."""
        self.recipe = recipe
        self.batches = batches
        self.env = env
        self.out_dir = Path(out_dir)
        self.settings = settings
        self.images_per_step = images_per_step
        self.meta = dict(meta or {})
        self.callbacks = list(callbacks)
        self.log_enabled = log and env.is_main
        torch.manual_seed(settings.seed)
        self.runtime = Runtime(env, settings.precision)
        recipe.build(self.runtime)
        self.checkpointer = Checkpointer(self.out_dir / "state", env.rank, settings.keep_checkpoints, recipe.upgrade)
        self.step = 0
        self.nan_streak = 0
        self.last_log: dict[str, float] = {}

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / METRICS_FILE

    # ------------------------------------------------------------------ one step

    def train_step(self, batch: Any) -> dict[str, float] | None:
        """One optimisation step at `self.step`; the logged values, or None when it was skipped
        because the loss was not finite."""
        recipe = self.recipe
        values = recipe.values_at(self.step)
        optimizers = recipe.optimizers()
        for name, optimizer in optimizers.items():
            optimizer.set_values(values.optimizers[name])
            optimizer.zero_grad()
        _, logs = recipe.forward_backward(batch, values)
        if not math.isfinite(logs["total"]):
            self.nan_streak += 1
            if self.nan_streak > self.settings.max_nan_steps:
                raise TrainingDiverged(f"loss was not finite for {self.nan_streak} consecutive steps "
                                       f"(last at step {self.step}); lower optim.lr or check the data")
            return None
        self.nan_streak = 0
        with self.runtime.section("optimizer"):
            for optimizer in optimizers.values():
                optimizer.step()
            recipe.after_optimizer_step(self.step + 1, values)
        return {**logs, **values.log()}

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        rank_state = {"rng": rng_state(), "nan_streak": self.nan_streak}
        return self.checkpointer.save(self.step, self.recipe.parts(), rank_state, self.meta)

    def _restore(self, step: int, rank_state: Mapping[str, Any]) -> None:
        self.step = step
        self.nan_streak = int(rank_state["nan_streak"])
        set_rng_state(rank_state["rng"])

    def resume(self) -> bool:
        """Continue this run from its latest complete checkpoint, if it has one."""
        path = self.checkpointer.latest()
        if path is None:
            return False
        self._restore(*self.checkpointer.load(path, self.recipe.parts()))
        if self.env.is_main:
            truncate_metrics(self.metrics_path, self.step)
        if self.log_enabled:
            print(f"[{self.recipe.name}] resumed from {path} at step {self.step}", flush=True)
        return True

    def take_over(self, state_dir: Path, parts: Sequence[str], flag: str) -> Path:
        """Start from another run's latest checkpoint: load the named parts, its step, RNG and NaN
        streak, so this run keeps counting where that one stopped; returns the checkpoint."""
        path = latest_checkpoint(state_dir)
        if path is None:
            raise InputError(f"{flag} {state_dir.parent}", "has no training checkpoint (no complete "
                             "state/step-* directory)", "the output of a training stage, whose state/ holds its "
                             "resumable checkpoints")
        own = self.recipe.parts()
        self._restore(*self.checkpointer.load(path, {name: own[name] for name in parts}))
        if self.log_enabled:
            print(f"[{self.recipe.name}] continuing {path} at step {self.step}", flush=True)
        return path

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, float]:
        """Train until `recipe.last_step()`; returns the last finite step's logged values."""
        last = self.recipe.last_step()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(self.recipe.name, self.step, last, self.images_per_step,
                             self.metrics_path if self.env.is_main else None, self.recipe.progress_keys,
                             enabled=self.log_enabled,
                             sinks=open_sinks(self.settings.loggers, self.out_dir, self.recipe.name, self.step,
                                              self.metrics_path)
                             if self.log_enabled else ())
        iterator = iter(self.batches(self.step))
        while self.step < last:
            start = time.perf_counter()
            batch = next(iterator)
            metrics.add_step(time.perf_counter() - start)
            logs = self.train_step(batch)
            self.step += 1
            if logs is not None:
                self.last_log = logs
            for callback in self.callbacks:
                callback(self.step)
            if self.step % self.settings.log_every == 0 or self.step == last:
                metrics.emit(self.step, self.last_log)
            if self.step % self.settings.checkpoint_every == 0 or self.step == last:
                self.save()
        return self.last_log
