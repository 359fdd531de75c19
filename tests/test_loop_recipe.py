"""The generic loop with a toy recipe (the worked example of docs/architecture.md): it trains, its EMA
teacher follows, it checkpoints, and a run killed at any step resumes to bit-equal weights."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from gramline.train.checkpoint import latest_checkpoint, list_checkpoints
from gramline.train.distributed import DistEnv
from gramline.train.loop import LoopSettings, TrainLoop
from gramline.train.optimizer import OptimizerValues, ScheduledAdamW
from gramline.train.recipe import StepValues
from gramline.train.runtime import Runtime
from gramline.train.schedules import Schedule, Timeline
from gramline.train.teachers import EmaTeacher, ModulePart

TRUE_W = torch.tensor([[2.0, -1.0, 0.5]])


class ToyRecipe:
    """Linear regression y = x·w with an EMA teacher: the smallest recipe the loop can drive."""

    name = "toy"
    loss_names = ("mse",)
    progress_keys = ("total", "mse", "lr")
    upgrade = None

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.lr = Timeline.of(Schedule(start=0.0, peak=0.1, end=0.01, warmup_steps=2), steps)

    def build(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.student = nn.Linear(3, 1, bias=False).to(runtime.device)
        self.teacher = EmaTeacher(self.student)
        groups = [{"params": list(self.student.parameters()), "lr_mult": 1.0, "wd_mult": 0.0, "is_last_layer": False}]
        self.optimizer = ScheduledAdamW(self.student, groups, (0.9, 0.999), clip_grad=1.0,
                                        clip_modules={"student": self.student}, device=runtime.device)

    def parts(self) -> dict[str, Any]:
        return {"student": ModulePart(self.student), "teacher": self.teacher, "optimizer": self.optimizer}

    def optimizers(self) -> dict[str, ScheduledAdamW]:
        return {"student": self.optimizer}

    def last_step(self) -> int:
        return self.steps

    def values_at(self, step: int) -> StepValues:
        return StepValues({"student": OptimizerValues(lr=self.lr.at(step), weight_decay=0.0)}, {"momentum": 0.9})

    def forward_backward(self, batch: tuple[Tensor, Tensor], values: StepValues) -> tuple[Tensor, dict[str, float]]:
        x, y = batch
        with self.runtime.autocast():
            loss = nn.functional.mse_loss(self.student(x), y)
        if torch.isfinite(loss):
            loss.backward()
        value = float(loss.detach())
        return loss, {"mse": value, "total": value}

    def after_optimizer_step(self, step: int, values: StepValues) -> None:
        self.teacher.update(self.student, values.scalars["momentum"])

    def export(self, directory: Path, step: int, metrics: Mapping[str, float], manifest: Mapping[str, Any]) -> dict:
        save_file({"weight": self.teacher.model.weight.detach().contiguous()}, str(directory / "toy.safetensors"))
        return {"step": step, **metrics}


def toy_batches(start_step: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Batch s is a pure function of s: the data position is the step."""
    step = start_step
    while True:
        x = torch.randn(16, 3, generator=torch.Generator().manual_seed(step))
        yield x, x @ TRUE_W.T
        step += 1


class Kill(Exception):
    pass


def train_toy(out: Path, steps: int, kill_at: int | None = None) -> TrainLoop:
    def kill(step: int) -> None:
        if step == kill_at:
            raise Kill

    recipe = ToyRecipe(steps)
    loop = TrainLoop(recipe, toy_batches, DistEnv(0, 1, 0, torch.device("cpu")), out,
                     LoopSettings(seed=1, log_every=2, checkpoint_every=3), images_per_step=16, callbacks=[kill])
    loop.resume()
    loop.run()
    recipe.export(out, loop.step, {}, {})
    return loop


def test_toy_recipe_learns_and_its_teacher_follows(tmp_path: Path) -> None:
    loop = train_toy(tmp_path / "run", steps=40)
    recipe = loop.recipe
    assert loop.step == 40 and [s for s, _ in list_checkpoints(tmp_path / "run" / "state")] == [39, 40]
    assert torch.dist(recipe.student.weight.detach(), TRUE_W) < 0.1 * TRUE_W.norm()
    assert torch.dist(recipe.teacher.model.weight, TRUE_W) < 0.2 * TRUE_W.norm()
    # the student moved; its EMA teacher lags behind it but not far
    lag = torch.dist(recipe.teacher.model.weight, recipe.student.weight.detach())
    assert 0 < lag < torch.dist(torch.zeros_like(TRUE_W), TRUE_W)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 20  # one record every 2 steps


@pytest.mark.parametrize("kill_at", [1, 4, 6, 7])
def test_killed_toy_run_resumes_to_bit_equal_weights(tmp_path: Path, kill_at: int) -> None:
    clean = tmp_path / "clean"
    train_toy(clean, steps=8)
    broken = tmp_path / "broken"
    with pytest.raises(Kill):
        train_toy(broken, steps=8, kill_at=kill_at)
    saved = latest_checkpoint(broken / "state")
    assert (saved is None) == (kill_at < 3)  # checkpoints at 3 and 6 (the kill comes before the save)
    train_toy(broken, steps=8)
    assert torch.equal(load_file(str(clean / "toy.safetensors"))["weight"],
                       load_file(str(broken / "toy.safetensors"))["weight"])
    a, b = (torch.load(latest_checkpoint(d / "state") / "model.pt", weights_only=True) for d in (clean, broken))
    assert torch.equal(a["student"]["weight"], b["student"]["weight"])
    for key, moments in a["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, b["optimizer"]["state"][key][name]), (key, name)
