"""The training stages' loggers besides metrics.jsonl: TensorBoard event files in the output Model
directory (the same values, step by step, a resumed run included), written by the main rank only;
MLflow asked for where it is not installed is a config error naming the key."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gramline.data.synthetic import write_synthetic_dataset
from gramline.stages import pretrain

QUICK = ["train.batch_size=8", "train.log_every=2", "heads.dino_prototypes=64", "heads.ibot_prototypes=64",
         "heads.dino_hidden=64", "heads.ibot_hidden=64", "crops.n_local=2", "train.teacher_checkpoint_every=0"]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "synth"
    write_synthetic_dataset(out, n_train=48, n_eval=8, size=64, seed=3, shard_max_count=24)
    return out


def argv(dataset: Path, out: Path, *sets: str) -> list[str]:
    return ["--dataset", str(dataset), "--out-model", str(out), *[a for o in QUICK + list(sets) for a in ("--set", o)]]


def event_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files in `log_dir` as (step, value), the way TensorBoard shows them."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def jsonl_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step":
                out.setdefault(key, []).append((record["step"], value))
    return out


class Interrupt(Exception):
    pass


def test_event_files_hold_the_metrics_records_step_by_step_across_a_resume(small_dataset: Path,
                                                                           tmp_path: Path) -> None:
    """Killed after logging step 4 and resumed from its step-3 checkpoint, the run logs steps 4-8
    again; TensorBoard shows each step once, with the values metrics.jsonl kept."""
    out = tmp_path / "model"
    args = argv(small_dataset, out, "train.steps=8", "train.checkpoint_every=3")

    def crash(recipe: object, step: int) -> None:
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        pretrain.main(args, hooks=[crash])
    assert pretrain.main(args) == 0

    log_dir = out / "tensorboard"
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2  # one per attempt
    expected, shown = jsonl_scalars(out / "metrics.jsonl"), event_scalars(log_dir)
    assert {"total", "dino_local", "dino_global", "ibot", "koleo", "lr", "steps_per_s", "data_wait_pct"} <= set(expected)
    assert set(shown) == set(expected)
    for tag, points in expected.items():
        assert [s for s, _ in shown[tag]] == [2, 4, 6, 8], tag
        assert [v for _, v in shown[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_tensorboard_can_be_switched_off(small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    assert pretrain.main(argv(small_dataset, out, "train.steps=2", "train.loggers.tensorboard=false")) == 0
    assert (out / "metrics.jsonl").is_file() and not (out / "tensorboard").exists()


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow is installed here")
def test_mlflow_configured_but_not_installed_exits_2_naming_the_key(small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = subprocess.run([sys.executable, "-m", "gramline.stages.pretrain",
                             *argv(small_dataset, out, "train.steps=2", "train.loggers.mlflow_uri=http://127.0.0.1:5000")],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 2, result.stderr
    assert "train.loggers.mlflow_uri" in result.stderr and "mlflow" in result.stderr.lower()
    assert "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="needs the mlflow extra")
def test_mlflow_run_gets_the_records_and_a_resumed_run_continues_it(small_dataset: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Against MLflow's file store (a tracking server stores the same records): one run for the
    stage, continued after a resume; the last value logged at each step is the metrics.jsonl one."""
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    out = tmp_path / "model"
    args = argv(small_dataset, out, "train.steps=6", "train.checkpoint_every=3", f"train.loggers.mlflow_uri={uri}")

    def crash(recipe: object, step: int) -> None:
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        pretrain.main(args, hooks=[crash])
    mlflow.end_run()  # what the interpreter's exit does after a crash
    assert pretrain.main(args) == 0

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("gramline").experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("pretrain", "FINISHED")]
    run_id = runs[0].info.run_id
    for tag, points in jsonl_scalars(out / "metrics.jsonl").items():
        history = sorted(client.get_metric_history(run_id, tag), key=lambda m: (m.step, m.timestamp))
        last = {m.step: m.value for m in history}
        assert sorted(last) == [s for s, _ in points] == [2, 4, 6], tag
        assert [last[s] for s, _ in points] == pytest.approx([v for _, v in points]), tag


@pytest.mark.slow
def test_only_the_main_rank_writes_events(small_dataset: Path, tmp_path: Path) -> None:
    """Two torchrun ranks, one event file (a file's name carries the writing process's id)."""
    out = tmp_path / "model"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "gramline.stages.pretrain", *argv(small_dataset, out, "train.steps=2")],
        capture_output=True, text=True, timeout=600, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert [s for s, _ in event_scalars(out / "tensorboard")["total"]] == [2]
