"""highres stage: config from the gram run, the per-step resolution mixture (data and run), start from the
gram teacher with a fixed Gram teacher at 1.5x, exact resume, bad input (exit 2)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from phase_run import BATCH, TinyRun, final_state, one_thread, sets, stage_exit_code, tiny_run, to_uint8
from PIL import Image
from safetensors.torch import load_file
from timm.layers import PatchEmbed

from gramline.artifacts import read_manifest
from gramline.data.reader import open_dataset
from gramline.stages import anchor, gram, highres
from gramline.train.checkpoint import latest_checkpoint
from gramline.train.data import batch_source
from gramline.train.distributed import DistEnv
from gramline.train.recipes.dino.config import SCHEDULE_PATHS, load_highres_config
from gramline.train.recipes.dino.mixture import MixtureChoice, mixture_augments, mixture_choice
from gramline.train.recipes.dino.recipe import DinoRecipe

STEPS = 6
REFERENCE = [f"train.steps={STEPS}", f"train.batch_size={BATCH}", "train.checkpoint_every=2", "train.log_every=1", "train.teacher_checkpoint_every=0"]


@pytest.fixture(scope="session")
def run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def gram_model(run: TinyRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short gram stage on the tiny run: the highres stage's input."""
    root = tmp_path_factory.mktemp("highres")
    anchor_dir, out = root / "anchor", root / "gram"
    with one_thread():
        assert anchor.main(["--model", str(run.pretrain), "--out-model", str(anchor_dir), *sets(["anchor.step=10"])]) == 0
        assert gram.main(["--model", str(run.pretrain), "--anchor", str(anchor_dir), "--dataset", str(run.dataset),
                          "--out-model", str(out), *sets(["phase.steps=3", "phase.refresh_at=[]"])]) == 0
    return out


def argv(run: TinyRun, model: Path, out: Path, overrides: list[str]) -> list[str]:
    return ["--model", str(model), "--dataset", str(run.dataset), "--out-model", str(out), *sets(overrides)]


# --------------------------------------------------------------------------- config and mixture


def test_config_is_a_new_run_with_the_recipe_schedules(gram_model: Path) -> None:
    config = load_highres_config("tiny", None, [], read_manifest(gram_model)["config"])
    total = config.train.steps
    run_heads = read_manifest(gram_model)["config"]["heads"]
    assert config.backbone.arch == "tiny" and config.heads.dino_prototypes == run_heads["dino_prototypes"]  # the run's
    for section, name in SCHEDULE_PATHS:  # nothing is inherited from the gram run's absolute schedules
        assert getattr(getattr(config, section), name).delay_steps == 0
    # LR: half-cosine ramp 0 -> 1e-3 over 10 steps, cos(linspace(0, pi, 10)) (at t: cos(pi t / 9)), then constant
    ramp5 = 1e-3 * (1 - math.cos(5 * math.pi / 9)) / 2
    assert [config.optim.lr.at(s, total) for s in (0, 5, 9, 10, 30)] == pytest.approx([0.0, ramp5, 1e-3, 1e-3, 1e-3])
    assert config.gram.enabled and config.gram.weight.at(0, total) == config.gram.weight.at(total, total) == 1.5
    assert config.loss.local_weight.at(3, total) == 0.5 and config.loss.teacher_temp.at(0, total) == 0.07
    assert config.ema.momentum.at(7, total) == pytest.approx(0.999) and config.optim.freeze_last_layer_steps == 0
    assert [config.gram_size_of(i) for i in range(2)] == [72, 96]  # 1.5 x (48, 64)
    assert (config.crops.global_size, config.crops.local_size, config.crops.gram_size) == (48, 24, 72)
    assert config.loss.koleo_group_size == 16


def test_mixture_choice_is_a_pure_function_of_the_step_with_the_given_weights() -> None:
    choice = MixtureChoice((0.8, 0.2), seed=65537)
    draws = [choice(s) for s in range(4000)]
    assert draws == [MixtureChoice((0.8, 0.2), seed=65537)(s) for s in range(4000)]  # any rank, any resume
    assert [choice(s) for s in reversed(range(50))] == draws[:50][::-1]
    share = Counter(draws)[1] / len(draws)
    assert abs(share - 0.2) < 0.03
    assert draws != [MixtureChoice((0.8, 0.2), seed=1)(s) for s in range(4000)]


def test_each_batch_uses_its_steps_resolution_set_with_gram_crops_at_1_5x(run: TinyRun, gram_model: Path) -> None:
    config = load_highres_config("tiny", None, ["crops.color_jitter_p=0", "crops.grayscale_p=0", "crops.solarize_p=0",
                                                "crops.blur_mode=official", f"train.batch_size={BATCH}"],
                                 read_manifest(gram_model)["config"])
    choice = mixture_choice(config)
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    source = batch_source(open_dataset(run.dataset), config, env, mixture_augments(config), choice)
    sizes = {0: (48, 24, 72), 1: (64, 32, 96)}
    seen = set()
    for start in (0, 3):  # a resumed stream agrees with a fresh one
        batches = source(start)
        for step in range(start, start + 4):
            batch = next(batches)
            global_size, local_size, gram_size = sizes[choice(step)]
            seen.add(global_size)
            assert batch.global_crops.shape[-1] == global_size and batch.local_crops.shape[-1] == local_size
            assert batch.gram_crops is not None and batch.gram_crops.shape[-1] == gram_size
            assert batch.masks.shape[1] == (global_size // 8) ** 2
            for big, small in zip(to_uint8(batch.gram_crops[:BATCH]), to_uint8(batch.global_crops[:BATCH])):
                down = np.asarray(Image.fromarray(big).resize((global_size,) * 2, Image.Resampling.BICUBIC))
                assert np.abs(down.astype(int) - small.astype(int)).max() <= 1
    assert seen == {48, 64}


# --------------------------------------------------------------------------- the run


class Observer:
    """Records what the run really did: the input side of every patch embedding call (a global
    forward hook) and, after step 1, whether student/teacher/Gram teacher still equal the input model."""

    def __init__(self, model: Path) -> None:
        self.sides: Counter[tuple[int, int]] = Counter()
        self.backbone = load_file(str(model / "backbone.safetensors"))
        self.heads = load_file(str(model / "heads.safetensors"))
        self.start_equal: dict[str, bool] = {}
        self.gram_fixed: list[bool] = []

    def forward_pre_hook(self, module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, PatchEmbed):
            self.sides[(args[0].shape[0], args[0].shape[-1])] += 1

    def __call__(self, recipe: DinoRecipe, step: int) -> None:
        vit = {k: v for k, v in recipe.student.backbone.vit.state_dict().items()}
        assert recipe.gram_backbone is not None
        gram_vit = recipe.gram_backbone.vit.state_dict()
        self.gram_fixed.append(all(torch.equal(gram_vit[k], v) for k, v in self.backbone.items()))
        if step == 1:  # the LR ramp starts at 0, so step 1 leaves the initial weights untouched
            teacher_vit = recipe.teacher.model.backbone.vit.state_dict()
            dino = recipe.student.dino_head.state_dict()
            self.start_equal = {
                "student": all(torch.equal(vit[k], v) for k, v in self.backbone.items()),
                # EMA of two equal weights: equal up to the rounding of m*x + (1-m)*x
                "teacher": all(torch.allclose(teacher_vit[k], v, rtol=1e-6, atol=1e-9) for k, v in self.backbone.items()),
                "heads": all(torch.equal(dino[k[len("dino_head."):]], v) for k, v in self.heads.items()
                             if k.startswith("dino_head.")),
                "mask_token": torch.equal(recipe.student.backbone.mask_token, self.heads["mask_token"]),
            }


@pytest.fixture(scope="module")
def reference(run: TinyRun, gram_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Observer]:
    out = tmp_path_factory.mktemp("highres") / "reference"
    observer = Observer(gram_model)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(observer.forward_pre_hook)
    try:
        with one_thread():
            assert highres.main(argv(run, gram_model, out, REFERENCE), hooks=[observer]) == 0
    finally:
        handle.remove()
    return out, observer


def test_runs_a_mixture_from_the_gram_teacher_with_a_fixed_gram_teacher(reference: tuple[Path, Observer]) -> None:
    out, observer = reference
    # the student's 2 global crops per image at 48 and 64 px; the Gram teacher's at 72 and 96 px
    global_sides = {side for (n, side) in observer.sides if n == 2 * BATCH}
    assert {48, 64} <= global_sides and {72, 96} <= global_sides
    assert observer.start_equal == {"student": True, "teacher": True, "heads": True, "mask_token": True}
    assert observer.gram_fixed == [True] * STEPS
    manifest = read_manifest(out)
    assert manifest["stage"] == "highres" and manifest["step"] == STEPS
    phase = manifest["highres_phase"]
    assert [r["gram_size"] for r in phase["resolutions"]] == [72, 96]
    assert sum(phase["steps_per_set"]) == STEPS and min(phase["steps_per_set"]) > 0
    assert phase["koleo_group_size"] == 16
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["gram_weight"] == 1.5 and "gram" in r for r in rows)


class Interrupt(Exception):
    pass


def test_resume_after_interruption_is_exact(run: TinyRun, gram_model: Path, reference: tuple[Path, Observer],
                                            tmp_path: Path) -> None:
    out = tmp_path / "interrupted"

    def crash(recipe: DinoRecipe, step: int) -> None:
        if step == 5:
            raise Interrupt

    with one_thread():
        with pytest.raises(Interrupt):
            highres.main(argv(run, gram_model, out, REFERENCE), hooks=[crash])
        assert latest_checkpoint(out / "state").name == "step-00000004"
        assert highres.main(argv(run, gram_model, out, REFERENCE)) == 0
    expected, got = final_state(reference[0]), final_state(out)
    for part in ("student", "teacher", "gram_teacher"):
        want, have = (state[part].get("weights", state[part]) for state in (expected, got))
        for key in want:
            assert torch.equal(want[key], have[key]), (part, key)
    assert got["step"] == STEPS


# --------------------------------------------------------------------------- bad input


def test_bad_input_exits_2_naming_the_problem(run: TinyRun, gram_model: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    bad = ["phase.resolutions=[{global_size: 48, local_size: 24}, {global_size: 60, local_size: 24}]"]
    assert stage_exit_code(highres.main_cli, argv(run, gram_model, out, bad)) == 2
    err = capsys.readouterr().err
    assert "phase.resolutions[1].global_size=60" in err and "patch size 8" in err

    odd_gram = ["phase.resolutions=[{global_size: 40, local_size: 24}]"]  # 1.5 x 40 = 60, not a multiple of 8
    assert stage_exit_code(highres.main_cli, argv(run, gram_model, out, odd_gram)) == 2
    assert "phase.resolutions[0].gram_size" in capsys.readouterr().err

    anchor_dir = tmp_path / "anchor"
    with one_thread():
        assert anchor.main(["--model", str(run.pretrain), "--out-model", str(anchor_dir), *sets(["anchor.step=10"])]) == 0
    assert stage_exit_code(highres.main_cli, argv(run, anchor_dir, out, [])) == 2
    err = capsys.readouterr().err
    assert f"--model {anchor_dir}" in err and "heads.safetensors" in err
    assert not out.exists()
