"""The recipe protocol: what a training stage says, so that one loop (gramline.train.loop) can run it.

A recipe owns the maths of a stage: which modules and teachers it builds, their parameter groups and
optimizers, the value of every schedule at a step, the forward pass, losses and backward, what
happens after each optimizer step (EMA updates, teacher refreshes), and what it exports. The loop
owns everything else: the step counter, the data position, the NaN guard, autocast and section
timing (through `Runtime`), logging, callbacks and checkpoints.

Per step the loop calls, in this order:
    values = recipe.values_at(step)
    for name, optimizer in recipe.optimizers().items():
        optimizer.set_values(values.optimizers[name]); optimizer.zero_grad()
    loss, logs = recipe.forward_backward(batch, values)   # skipped below when logs["total"] is not finite
    for optimizer in recipe.optimizers().values(): optimizer.step()
    recipe.after_optimizer_step(step + 1, values)
and checkpoints `recipe.parts()` (plus the step, RNG and NaN streak) every `checkpoint_every` steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from gramline.train.checkpoint import Stateful, Upgrade
from gramline.train.optimizer import OptimizerValues, ScheduledAdamW
from gramline.train.runtime import Runtime


@dataclass(frozen=True)
class StepValues:
    """One step's scheduled values: each optimizer's LR and weight decay, and the recipe's own."""

    optimizers: Mapping[str, OptimizerValues]
    scalars: Mapping[str, float] = field(default_factory=dict)

    def log(self) -> dict[str, float]:
        """lr/wd (prefixed by the optimizer's name when there are several) and the scalars."""
        out: dict[str, float] = {}
        for name, values in self.optimizers.items():
            prefix = "" if len(self.optimizers) == 1 else f"{name}."
            out[f"{prefix}lr"] = values.lr
            out[f"{prefix}wd"] = values.weight_decay
        return {**out, **self.scalars}


class Recipe(Protocol):
    name: str  # prefix of progress lines
    loss_names: Sequence[str]  # the loss terms in `logs` (the artifacts' final_<name> metrics, with total)
    progress_keys: Sequence[str]  # the values the progress line shows
    upgrade: Upgrade | None  # converts a checkpoint of the first layout, or None

    def build(self, runtime: Runtime) -> None:
        """Create modules, teachers and optimizers on `runtime.device` (the loop has seeded torch)."""

    def parts(self) -> Mapping[str, Stateful]:
        """Everything a checkpoint must hold besides the step, RNG and NaN streak, by name."""

    def optimizers(self) -> Mapping[str, ScheduledAdamW]: ...

    def last_step(self) -> int:
        """The step count at which the run ends (known once a continued run's state is loaded)."""

    def values_at(self, step: int) -> StepValues: ...

    def forward_backward(self, batch: Any, values: StepValues) -> tuple[Tensor, dict[str, float]]:
        """Losses of one batch, back-propagated unless the total is not finite; `logs["total"]` is it."""

    def after_optimizer_step(self, step: int, values: StepValues) -> None:
        """After the optimizers' update of step `step` (counted from 1): EMA updates, refreshes."""

    def export(self, directory: Path, step: int, metrics: Mapping[str, float],
               manifest: Mapping[str, Any]) -> dict[str, Any] | None:
        """Write the stage's artifact into `directory` (manifest last, with `manifest`'s entries).
        Called on every rank (a rank writes what it holds); returns the manifest on the main rank."""
