"""The DINO recipe's per-step values, read at run time from its config and where its phase started.

Pretrain and highres: every schedule counts from step 0 over `train.steps`. The gram stage continues
a run at step S (known once that run's state is loaded, kept in the `PhaseStart` part): the run's
schedules carry on at the run's own step over the run's `train.steps`; from S on the Gram weight
ramps 0 → `phase.weight` and the DINO local weight from the run's value at S to
`phase.local_weight` (half cosine over `phase.ramp_steps`), and `phase.lr`, when given, is the LR
counted from S. The official Gram config expresses the same by defining all schedules from
iteration 0 with the Gram weight held at 0 until the phase starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gramline.train.optimizer import OptimizerValues
from gramline.train.recipe import StepValues
from gramline.train.recipes.dino.config import DinoConfig, GramStageConfig
from gramline.train.schedules import Schedule, Timeline


@dataclass
class PhaseStart:
    """Where a continuing stage took its run over (0 for a stage that starts a run)."""

    start_step: int = 0
    continued_from: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"start_step": self.start_step, "continued_from": self.continued_from}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start_step = int(state["start_step"])
        self.continued_from = state.get("continued_from")


@dataclass(frozen=True)
class DinoSchedules:
    lr: Timeline
    weight_decay: Timeline
    momentum: Timeline
    teacher_temp: Timeline
    local_weight: Timeline
    gram_weight: Timeline | None  # None: the Gram term is off
    freeze_last_layer_steps: int
    head_warmup_steps: int  # steps < this train the heads only (the backbone gets LR 0)
    last_step: int

    @classmethod
    def of(cls, config: DinoConfig, start_step: int = 0) -> DinoSchedules:
        steps = config.train.steps
        timelines = {name: Timeline.of(schedule, steps) for name, schedule in (
            ("lr", config.optim.lr), ("weight_decay", config.optim.weight_decay), ("momentum", config.ema.momentum),
            ("teacher_temp", config.loss.teacher_temp), ("local_weight", config.loss.local_weight),
            ("gram_weight", config.gram.weight))}
        last = steps
        if isinstance(config, GramStageConfig):
            p, start = config.phase, start_step
            local_now = timelines["local_weight"].at(start)
            timelines["lr"] = timelines["lr"].then(start, p.lr, p.steps)
            timelines["gram_weight"] = timelines["gram_weight"].then(start, Schedule.ramp(0.0, p.weight, p.ramp_steps),
                                                                     p.steps)
            timelines["local_weight"] = timelines["local_weight"].then(
                start, Schedule.ramp(local_now, p.local_weight, p.ramp_steps), p.steps)
            last = start + p.steps
        gram = timelines.pop("gram_weight")
        return cls(**timelines, gram_weight=gram if config.gram.enabled else None,
                   freeze_last_layer_steps=config.optim.freeze_last_layer_steps,
                   head_warmup_steps=config.init.head_warmup_steps, last_step=last)

    def at(self, step: int, lr_scale: float) -> StepValues:
        frozen = step < self.freeze_last_layer_steps
        heads_only = step < self.head_warmup_steps
        optimizer = OptimizerValues(lr=self.lr.at(step) * lr_scale, weight_decay=self.weight_decay.at(step),
                                    last_layer_lr_factor=0.0 if frozen else 1.0,
                                    backbone_lr_factor=0.0 if heads_only else 1.0)
        scalars = {"momentum": self.momentum.at(step), "teacher_temp": self.teacher_temp.at(step),
                   "local_weight": self.local_weight.at(step),
                   "gram_weight": self.gram_weight.at(step) if self.gram_weight is not None else 0.0}
        if self.head_warmup_steps:
            scalars["backbone_frozen"] = 1.0 if heads_only else 0.0
        return StepValues({"optimizer": optimizer}, scalars)
