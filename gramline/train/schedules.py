"""Per-step schedules: the official `linear_warmup_cosine_decay`, and timelines of them.

`Schedule` is the config type of every scheduled value (LR, weight decay, EMA momentum, teacher
temperature, loss weights). It follows `dinov3/train/cosine_lr_scheduler.py::linear_warmup_cosine_decay`
in the official repository: a linear warmup start → peak over `warmup_steps` (the peak itself is
first reached when the warmup is over), then a half cosine peak → end over `cosine_steps` steps
that reaches `end` on its last step (`cos(linspace(0, pi, C))`), then `end`. `delay_steps` holds
`start` first (a warmup with start == peak does the same; the delay says it directly).

A `Timeline` is what a run evaluates at each step: one schedule from step 0, and, for a stage that
continues a run, the phase's own schedules from the phase's first step on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import model_validator

from gramline.config import Strict


class Schedule(Strict):
    """start → peak linearly over `warmup_steps`, a half cosine peak → end over `cosine_steps`
    (default: the rest of the run), then `end`. A scalar in a config means a constant."""

    start: float = 0.0
    peak: float = 0.0
    end: float = 0.0
    warmup_steps: int = 0
    cosine_steps: int | None = None
    delay_steps: int = 0

    @model_validator(mode="before")
    @classmethod
    def _scalar_is_constant(cls, data: Any) -> Any:
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return {"start": data, "peak": data, "end": data}
        return data

    @model_validator(mode="after")
    def _non_negative(self) -> Schedule:
        if self.warmup_steps < 0 or self.delay_steps < 0 or (self.cosine_steps or 0) < 0:
            raise ValueError("warmup_steps, cosine_steps and delay_steps must be >= 0")
        return self

    @classmethod
    def constant(cls, value: float) -> Schedule:
        return cls(start=value, peak=value, end=value)

    @classmethod
    def ramp(cls, start: float, end: float, steps: int) -> Schedule:
        """A half-cosine ramp start → end over `steps` steps, then `end`."""
        return cls(start=start, peak=start, end=end, cosine_steps=steps)

    def at(self, step: int, total_steps: int) -> float:
        """The value at `step` of a run of `total_steps` steps (which sets the default cosine length)."""
        step -= self.delay_steps
        if step < 0:
            return self.start
        if step < self.warmup_steps:
            return self.start + (self.peak - self.start) * step / self.warmup_steps
        cosine = self.cosine_steps if self.cosine_steps is not None else total_steps - self.delay_steps - self.warmup_steps
        t = step - self.warmup_steps
        if cosine <= 0 or t >= cosine:
            return self.end
        if cosine == 1:
            return self.peak
        return self.end + 0.5 * (self.peak - self.end) * (1 + math.cos(math.pi * t / (cosine - 1)))


@dataclass(frozen=True)
class Segment:
    first_step: int  # the run step at which this schedule's own step 0 falls
    schedule: Schedule
    steps: int  # the length its default cosine is measured over


@dataclass(frozen=True)
class Timeline:
    """Schedules in force from given steps on: the value at a step comes from the last segment that has
    started, read at the step counted from that segment's first step."""

    segments: tuple[Segment, ...]

    @classmethod
    def of(cls, schedule: Schedule, steps: int) -> Timeline:
        return cls((Segment(0, schedule, steps),))

    def then(self, first_step: int, schedule: Schedule | None, steps: int) -> Timeline:
        """This timeline, and from `first_step` on `schedule` (None: this timeline carries on)."""
        if schedule is None:
            return self
        return Timeline((*self.segments, Segment(first_step, schedule, steps)))

    def at(self, step: int) -> float:
        segment = self.segments[0]
        for candidate in self.segments[1:]:
            if candidate.first_step <= step:
                segment = candidate
        return segment.schedule.at(step - segment.first_step, segment.steps)
