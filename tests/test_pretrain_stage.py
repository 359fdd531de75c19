"""The pretrain stage: exact resume, bad inputs (exit 2, nothing half-written), torchrun, NaN abort."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gramline.data.collate import CropBatch
from gramline.data.reader import open_dataset
from gramline.data.synthetic import write_synthetic_dataset
from gramline.stages import pretrain
from gramline.train.data import batch_source
from gramline.train.distributed import DistEnv
from gramline.train.loop import LoopSettings, TrainingDiverged, TrainLoop
from gramline.train.recipes.dino.config import load_pretrain_config
from gramline.train.recipes.dino.recipe import DinoRecipe

QUICK = ["train.batch_size=8", "train.log_every=2", "heads.dino_prototypes=64", "heads.ibot_prototypes=64",
         "heads.dino_hidden=64", "heads.ibot_hidden=64", "crops.n_local=2"]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "synth"
    write_synthetic_dataset(out, n_train=96, n_eval=16, size=64, seed=3, shard_max_count=24)
    return out


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gramline.stages.pretrain", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600, check=False)


class Interrupt(Exception):
    pass


def test_killed_and_resumed_run_equals_uninterrupted_run(small_dataset: Path, tmp_path: Path) -> None:
    steps = ["train.steps=8", "train.checkpoint_every=3", "train.teacher_checkpoint_every=4"]
    clean = tmp_path / "clean"
    assert pretrain.main(["--dataset", str(small_dataset), "--out-model", str(clean),
                          *[a for o in QUICK + steps for a in ("--set", o)]]) == 0

    resumed = tmp_path / "resumed"
    argv = ["--dataset", str(small_dataset), "--out-model", str(resumed), *[a for o in QUICK + steps for a in ("--set", o)]]

    def crash(recipe: DinoRecipe, step: int) -> None:
        if step == 5:  # after the step-3 checkpoint, before the step-6 one
            raise Interrupt

    with pytest.raises(Interrupt):
        pretrain.main(argv, hooks=[crash])
    assert not (resumed / "manifest.json").exists()  # no final artifact from a killed run
    assert sorted(p.name for p in (resumed / "state").iterdir()) == ["step-00000003"]

    assert pretrain.main(argv) == 0
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert manifest["step"] == 8 and manifest["resumed"] is True
    for name in ("backbone.safetensors", "heads.safetensors"):
        a, b = load_file(str(clean / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resume"
    # the logged curve is the same too (timings aside)
    def strip(path: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k in ("step", "total", "ibot", "koleo")}
                for line in path.read_text().splitlines()]

    assert strip(clean / "metrics.jsonl") == strip(resumed / "metrics.jsonl")
    # periodic teacher checkpoints for the anchor stage are complete Model artifacts
    assert (clean / "checkpoints" / "teacher-00000004" / "backbone.safetensors").is_file()
    assert json.loads((clean / "checkpoints" / "teacher-00000004" / "manifest.json").read_text())["kind"] == "Model"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "train.stepz=3"], "train.stepz"),
        (["--set", "train.steps=many"], "train.steps"),
        (["--set", "crops.global_size=44"], "patch size"),
        (["--set", "crops.n_local=99"], "crops.n_local"),
        (["--set", "crops.local_size=64"], "crops.local_size"),
        (["--preset", "huge"], "preset"),
    ],
)
def test_bad_config_exits_2_naming_the_field(small_dataset: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "model"
    result = run_cli("--dataset", str(small_dataset), "--out-model", str(out), *args)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_missing_or_empty_dataset_exits_2(tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = run_cli("--dataset", str(tmp_path / "nope"), "--out-model", str(out))
    assert result.returncode == 2 and "nope" in result.stderr and "does not exist" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("--dataset", str(empty), "--out-model", str(out))
    assert result.returncode == 2 and "manifest.json" in result.stderr
    assert not out.exists()


def test_dataset_without_train_split_exits_2(tmp_path: Path) -> None:
    from gramline.data.synthetic import CLASSES, encode_png, render_sample
    from gramline.data.writer import DatasetWriter, ShardSample

    data = tmp_path / "evalonly"
    with DatasetWriter(data, stage="test") as writer:
        sample = render_sample(0, 0, 32)
        writer.add("eval", ShardSample(key="s0", image=encode_png(sample.image), image_ext="png", label=sample.label))
        writer.close(classes=list(CLASSES))
    result = run_cli("--dataset", str(data), "--out-model", str(tmp_path / "m"))
    assert result.returncode == 2 and "train" in result.stderr


def test_resume_with_other_architecture_is_refused(small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    sets = [a for o in QUICK + ["train.steps=2"] for a in ("--set", o)]
    assert run_cli("--dataset", str(small_dataset), "--out-model", str(out), *sets).returncode == 0
    result = run_cli("--dataset", str(small_dataset), "--out-model", str(out), *sets, "--set", "heads.dino_prototypes=32")
    assert result.returncode == 2 and "different heads config" in result.stderr


def test_executor_output_carries_uri_and_metrics(small_dataset: Path, tmp_path: Path) -> None:
    out, executor = tmp_path / "model", tmp_path / "kfp" / "executor_output.json"
    sets = [a for o in QUICK + ["train.steps=2"] for a in ("--set", o)]
    result = run_cli("--dataset", str(small_dataset), "--out-model", str(out), *sets,
                     "--executor-output", str(executor), "--output-uri", "model=s3://bucket/run/model")
    assert result.returncode == 0, result.stderr
    entry = json.loads(executor.read_text())["artifacts"]["model"]["artifacts"][0]
    assert entry["uri"] == "s3://bucket/run/model" and entry["name"] == "model"
    assert entry["metadata"]["step"] == 2 and "final_total" in entry["metadata"]


def test_repeated_nan_losses_abort(small_dataset: Path, tmp_path: Path) -> None:
    config = load_pretrain_config("tiny", overrides=QUICK + ["train.steps=10", "train.max_nan_steps=2"])
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    batch = next(batch_source(open_dataset(small_dataset), config, env)(0))
    poisoned = CropBatch(batch.global_crops * float("nan"), batch.local_crops, None, batch.masks, batch.batch_size)
    recipe = DinoRecipe(config, "pretrain", log=False)
    trainer = TrainLoop(recipe, lambda step: iter(()), env, tmp_path, LoopSettings.of(config.train), images_per_step=8,
                        log=False)
    before = [p.detach().clone() for p in recipe.student.parameters()]
    assert trainer.train_step(poisoned) is None and trainer.train_step(poisoned) is None  # skipped, not applied
    assert all(torch.equal(a, b) for a, b in zip(before, recipe.student.parameters()))
    with pytest.raises(TrainingDiverged, match="3 consecutive"):
        trainer.train_step(poisoned)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_torchrun_on_cpu(small_dataset: Path, tmp_path: Path, parallel: str) -> None:
    """The stage under torchrun, DDP or FSDP2, teacher checkpoints included (under FSDP2 every rank
    takes part in their export)."""
    out = tmp_path / "model"
    settings = QUICK + ["train.steps=4", "train.checkpoint_every=2", f"train.distributed={parallel}",
                        "train.teacher_checkpoints=2"]
    sets = [a for o in settings for a in ("--set", o)]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "gramline.stages.pretrain", "--dataset", str(small_dataset), "--out-model",
         str(out), *sets],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["step"] == 4
    state = out / "state" / "step-00000004"
    assert (state / "rank-0.pt").is_file() and (state / "rank-1.pt").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["teacher-00000002", "teacher-00000004"]
    final, last = (load_file(str(d / "backbone.safetensors")) for d in (out, out / "checkpoints" / "teacher-00000004"))
    assert all(torch.equal(final[k], last[k]) for k in final)  # the step-4 checkpoint is the exported teacher
    # global batch = 2 ranks x 8: the sqrt LR scaling used 16
    lr = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    config = load_pretrain_config("tiny", overrides=QUICK)
    expected = config.optim.lr.at(4 - 1, 4) * 4 * (16 / 1024) ** 0.5
    assert lr[-1] == pytest.approx(expected)


def to_first_layout(checkpoint: Path) -> None:
    """Rewrite a checkpoint as gramline 0.1 wrote it: model.pt {student, teacher, optimizer,
    gram_teacher, step, extra}, rank files {step, rng, nan_streak}, no layout keys, no meta.json."""
    state = torch.load(checkpoint / "model.pt", weights_only=True)
    old = {"student": state["student"], "teacher": state["teacher"], "optimizer": state["optimizer"],
           "gram_teacher": None, "step": state["step"], "extra": {"config": {}}}
    torch.save(old, checkpoint / "model.pt")
    for rank_file in checkpoint.glob("rank-*.pt"):
        rank = torch.load(rank_file, weights_only=True)
        torch.save({"step": rank["step"], "rng": rank["rng"], "nan_streak": rank["nan_streak"]}, rank_file)
    (checkpoint / "meta.json").unlink()


def test_checkpoints_of_the_first_layout_resume_and_unknown_layouts_are_refused(small_dataset: Path,
                                                                                 tmp_path: Path) -> None:
    steps = ["train.steps=6", "train.checkpoint_every=3", "train.teacher_checkpoint_every=0"]
    argv = lambda out: ["--dataset", str(small_dataset), "--out-model", str(out),
                        *[a for o in QUICK + steps for a in ("--set", o)]]
    clean, old = tmp_path / "clean", tmp_path / "old"
    assert pretrain.main(argv(clean)) == 0

    def crash(recipe: DinoRecipe, step: int) -> None:
        if step == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        pretrain.main(argv(old), hooks=[crash])
    to_first_layout(old / "state" / "step-00000003")
    assert pretrain.main(argv(old)) == 0
    for name in ("backbone.safetensors", "heads.safetensors"):
        a, b = load_file(str(clean / name)), load_file(str(old / name))
        assert all(torch.equal(a[key], b[key]) for key in a), name

    future = tmp_path / "future"
    with pytest.raises(Interrupt):
        pretrain.main(argv(future), hooks=[crash])
    state = torch.load(future / "state" / "step-00000003" / "model.pt", weights_only=True)
    torch.save({**state, "layout": 99}, future / "state" / "step-00000003" / "model.pt")
    result = run_cli(*argv(future))
    assert result.returncode == 2 and "layout 99" in result.stderr and "Traceback" not in result.stderr


def test_teacher_checkpoints_spread_over_the_run_capped_with_the_artifacts_permissions(small_dataset: Path,
                                                                                       tmp_path: Path) -> None:
    """The tiny preset asks for 4 teacher checkpoints over the run: 12 steps -> every 3 (3, 6, 9, 12).
    With at most 3 kept, writing the 4th drops every other one from the oldest: 3 and 9 remain.
    Weights are written like every other file of the artifact: 0666 less the umask (here 027)."""
    out = tmp_path / "model"
    previous = os.umask(0o027)
    try:
        assert pretrain.main(["--dataset", str(small_dataset), "--out-model", str(out),
                              *[a for o in QUICK + ["train.steps=12", "train.checkpoint_every=12",
                                                                    "train.keep_teacher_checkpoints=3"] for a in ("--set", o)]]) == 0
    finally:
        os.umask(previous)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["teacher-00000003", "teacher-00000009"]
    for artifact in (out, out / "checkpoints" / "teacher-00000009"):
        modes = {p.name: p.stat().st_mode & 0o777 for p in artifact.iterdir() if p.is_file()}
        assert modes["backbone.safetensors"] == modes["heads.safetensors"] == modes["manifest.json"] == 0o640, modes


def test_teacher_checkpoint_cadence_follows_train_steps_unless_set() -> None:
    """The tiny deployment profile asks for 2 teacher checkpoints; a user who lengthens its 8-step
    pretrain to 500 gets 2 (every 250), not 125; an explicit cadence is kept as given."""
    from gramline.kfp.profiles import deployment_profile

    profile = [f"{k}={json.dumps(v)}" for k, v in deployment_profile("tiny").overrides["pretrain"].items()]
    assert load_pretrain_config("tiny", overrides=profile).train.teacher_every() == 4
    assert load_pretrain_config("tiny", overrides=[*profile, "train.steps=500"]).train.teacher_every() == 250
    explicit = load_pretrain_config("tiny", overrides=[*profile, "train.steps=500", "train.teacher_checkpoint_every=4"])
    assert explicit.train.teacher_every() == 4
    off = load_pretrain_config("tiny", overrides=[*profile, "train.teacher_checkpoints=0"])
    assert off.train.teacher_every() == 0
