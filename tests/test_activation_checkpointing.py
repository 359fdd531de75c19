"""Activation checkpointing per block (selective, full) gives the gradients of no checkpointing,
recomputes blocks in backward when the recipe is configured for it, and lowers the step's peak
memory as the memory plan measures it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from gramline.data.collate import CropBatch
from gramline.train.distributed import DistEnv
from gramline.train.loop import LoopSettings, TrainLoop
from gramline.train.memory import step_peak_bytes
from gramline.train.recipes.dino.config import DinoConfig, load_pretrain_config
from gramline.train.recipes.dino.model import DinoModel
from gramline.train.recipes.dino.recipe import DinoRecipe

SMALL = ["heads.dino_prototypes=32", "heads.ibot_prototypes=32", "heads.dino_hidden=32", "heads.ibot_hidden=32",
         "crops.n_local=2", "train.batch_size=2"]


def tiny(*overrides: str) -> DinoConfig:
    return load_pretrain_config("tiny", overrides=[*SMALL, *overrides])


def gradients(model: DinoModel, mode: str) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model)
    model.backbone.activation_checkpointing = mode
    gen = torch.Generator().manual_seed(0)
    images, local = torch.randn(4, 3, 48, 48, generator=gen), torch.randn(4, 3, 24, 24, generator=gen)
    masks = torch.rand(4, 36, generator=gen) < 0.3
    torch.manual_seed(1)  # drop-path and RoPE rescale draws: the recomputation must replay them
    out = model(images, local, masks, masks.flatten().nonzero().squeeze(1))
    weights = {k: torch.randn(v.shape, generator=gen) for k, v in out.items()}
    sum((out[k] * weights[k]).sum() for k in out).backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_blocks_give_the_same_gradients() -> None:
    config = tiny("backbone.drop_path_rate=0.2")
    torch.manual_seed(0)
    model = DinoModel(config.backbone, config.heads).train()
    want = gradients(model, "none")
    assert any(name.startswith("backbone.vit.blocks.") for name in want)
    for mode in ("selective", "full"):
        got = gradients(model, mode)
        assert got.keys() == want.keys()
        for name in want:
            assert torch.allclose(got[name], want[name], rtol=0, atol=1e-7), f"{mode}: {name}"


@pytest.mark.parametrize(("mode", "calls_per_group"), [("none", 1), ("full", 2)])
def test_the_recipe_recomputes_its_blocks_in_backward(tmp_path: Path, mode: str, calls_per_group: int) -> None:
    config = tiny("train.steps=1", f"train.activation_checkpointing={mode}")
    recipe = DinoRecipe(config, "pretrain", log=False)
    loop = TrainLoop(recipe, lambda step: iter(()), DistEnv(0, 1, 0, torch.device("cpu")), tmp_path,
                     LoopSettings.of(config.train), images_per_step=2, log=False)
    calls = []
    for block in recipe.student.backbone.vit.blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(1))  # recomputation stops early: no post hook
    gen = torch.Generator().manual_seed(0)
    batch = CropBatch(torch.randn(4, 3, 48, 48, generator=gen), torch.randn(4, 3, 24, 24, generator=gen), None,
                      torch.rand(4, 36, generator=gen) < 0.3, 2)
    assert loop.train_step(batch) is not None
    groups, depth = 2, len(recipe.student.backbone.vit.blocks)  # global and local crops
    assert len(calls) == groups * depth * calls_per_group


def test_checkpointing_lowers_the_measured_peak() -> None:
    config = tiny()
    peak = {mode: step_peak_bytes(config, 2, None, mode, torch.device("cpu"), dtype=None)
            for mode in ("none", "selective", "full")}
    assert peak["none"] > peak["selective"] > peak["full"], peak
