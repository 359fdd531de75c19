"""anchor stage: choice by step, choice by dense quality against a deliberately degraded checkpoint,
the exported frozen Gram-teacher artifact, and bad input (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from phase_run import TinyRun, one_thread, sets, stage_exit_code, tiny_run
from safetensors.torch import load_file, save_file

from gramline.stages import anchor


@pytest.fixture(scope="session")
def run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    return tiny_run(tmp_path_factory)


def copy_run(run: TinyRun, dest: Path) -> Path:
    """The run's manifest and teacher checkpoints (what the anchor stage reads)."""
    dest.mkdir(parents=True)
    shutil.copy(run.pretrain / "manifest.json", dest / "manifest.json")
    shutil.copytree(run.pretrain / "checkpoints", dest / "checkpoints")
    return dest


def degrade(checkpoint: Path) -> None:
    """Zero the patch embedding: every patch token starts equal, so patch features carry no
    image content and patch correspondence collapses."""
    path = checkpoint / "backbone.safetensors"
    state = load_file(str(path))
    state["patch_embed.proj.weight"].zero_()
    state["patch_embed.proj.bias"].zero_()
    save_file(state, str(path))


def test_by_step_exports_that_checkpoint_backbone_only(run: TinyRun, tmp_path: Path) -> None:
    out = tmp_path / "anchor"
    with one_thread():
        assert anchor.main(["--model", str(run.pretrain), "--out-model", str(out), *sets(["anchor.step=10"])]) == 0
    source = run.pretrain / "checkpoints" / "teacher-00000010"
    assert (out / "backbone.safetensors").read_bytes() == (source / "backbone.safetensors").read_bytes()
    assert not (out / "heads.safetensors").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "Model" and manifest["stage"] == "anchor" and manifest["step"] == 10
    assert manifest["anchor"]["checkpoint"] == "teacher-00000010" and manifest["anchor"]["mode"] == "step"
    assert manifest["anchor"]["available_steps"] == [10, 20]
    # a plain timm model loads it strictly
    spec = manifest["timm"]
    model = timm.create_model(spec["name"], pretrained=True,
                              pretrained_cfg_overlay={"file": str(out / "backbone.safetensors")}, **spec["kwargs"])
    expected = load_file(str(source / "backbone.safetensors"))
    assert torch.equal(model.state_dict()["patch_embed.proj.weight"], expected["patch_embed.proj.weight"])


@pytest.mark.parametrize("degraded_step, better_step", [(20, 10), (10, 20)])
def test_dense_choice_picks_the_undegraded_checkpoint(run: TinyRun, tmp_path: Path, degraded_step: int,
                                                      better_step: int) -> None:
    model = copy_run(run, tmp_path / "run")
    degrade(model / "checkpoints" / f"teacher-{degraded_step:08d}")
    out = tmp_path / "anchor"
    with one_thread():
        code = anchor.main(["--model", str(model), "--dataset", str(run.dataset), "--out-model", str(out),
                            *sets(["anchor.images=16"])])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    why = manifest["anchor"]
    assert why["mode"] == "dense" and manifest["step"] == better_step
    assert why["checkpoint"] == f"teacher-{better_step:08d}"
    rows = {row["step"]: row for row in why["candidates"]}
    assert sorted(rows) == [10, 20]
    assert rows[degraded_step]["correspondence"] < rows[better_step]["correspondence"]
    assert rows[20]["gram_corr_to_latest"] == pytest.approx(1.0)  # the latest is the Gram reference
    chosen = model / "checkpoints" / f"teacher-{better_step:08d}" / "backbone.safetensors"
    assert (out / "backbone.safetensors").read_bytes() == chosen.read_bytes()
    assert manifest["metrics"]["correspondence"] == rows[better_step]["correspondence"]


def test_bad_input_exits_2_naming_the_problem(run: TinyRun, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "anchor"
    code = stage_exit_code(anchor.main_cli, ["--model", str(run.pretrain), "--out-model", str(out),
                                             *sets(["anchor.step=7"])])
    assert code == 2
    err = capsys.readouterr().err
    assert "anchor.step" in err and "10, 20" in err
    assert not out.exists()

    no_checkpoints = tmp_path / "bare"
    no_checkpoints.mkdir()
    shutil.copy(run.pretrain / "manifest.json", no_checkpoints / "manifest.json")
    code = stage_exit_code(anchor.main_cli, ["--model", str(no_checkpoints), "--out-model", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--model {no_checkpoints}" in err and "no teacher checkpoints" in err

    code = stage_exit_code(anchor.main_cli, ["--model", str(run.pretrain), "--out-model", str(out)])
    assert code == 2 and "--dataset" in capsys.readouterr().err
    assert not out.exists()
