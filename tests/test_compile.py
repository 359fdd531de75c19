"""torch.compile per block and per head (`train.compile`) trains the tiny DINO recipe to the losses
of eager mode.

Tolerance: 1e-4 relative on every loss term over 3 steps. Inductor fuses and reorders float32
arithmetic (measured differences: a few 1e-6 relative); a wrong compiled graph (a dropped mask, a
stale shape) moves a loss term by far more than 1e-4.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from gramline.data.collate import CropBatch
from gramline.train.distributed import DistEnv
from gramline.train.loop import LoopSettings, TrainLoop
from gramline.train.recipes.dino.config import load_pretrain_config
from gramline.train.recipes.dino.recipe import DinoRecipe

STEPS = 3
RTOL = 1e-4
TERMS = ("total", "dino_global", "ibot", "koleo")


def losses(out: Path, compile_: bool) -> list[dict[str, float]]:
    config = load_pretrain_config("tiny", overrides=[
        f"train.compile={compile_}", f"train.steps={STEPS}", "train.batch_size=2", "crops.n_local=0",
        "heads.dino_prototypes=32", "heads.ibot_prototypes=32", "heads.dino_hidden=32", "heads.ibot_hidden=32"])
    recipe = DinoRecipe(config, "pretrain", log=False)
    loop = TrainLoop(recipe, lambda step: iter(()), DistEnv(0, 1, 0, torch.device("cpu")), out,
                     LoopSettings.of(config.train), images_per_step=2, log=False)
    gen = torch.Generator().manual_seed(0)
    logs = []
    for _ in range(STEPS):
        # one crop size, and one masked patch per crop at every step, so that both heads see 4 rows:
        # one graph for the 4 blocks and one for the 2 heads (a compile on CPU takes most of this test)
        masks = torch.rand(4, 36, generator=gen).argsort(dim=1) < 1
        batch = CropBatch(torch.randn(4, 3, 48, 48, generator=gen), torch.empty(0, 3, 0, 0), None, masks, 2)
        step_logs = loop.train_step(batch)
        assert step_logs is not None
        logs.append({k: step_logs[k] for k in TERMS})
        loop.step += 1
    return logs


@pytest.mark.slow  # about 35 s of CPU, nearly all of it inductor compiling 2 graphs (forward and backward)
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on CPU compiles C++: no compiler on this machine")
def test_compiled_blocks_and_heads_match_eager(tmp_path: Path) -> None:
    torch._dynamo.reset()
    eager = losses(tmp_path / "eager", False)
    compiled = losses(tmp_path / "compiled", True)
    counters = torch._dynamo.utils.counters["stats"]
    assert counters["unique_graphs"] > 0  # the blocks and heads really went through the compiler
    for step, (a, b) in enumerate(zip(compiled, eager)):
        for key in TERMS:
            assert a[key] == pytest.approx(b[key], rel=RTOL), f"step {step + 1} {key}"
