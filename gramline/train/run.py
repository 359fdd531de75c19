"""The skeleton every training stage shares: dataset → resume check → distributed setup → loop → export.

A stage describes itself as a `TrainingRun` (its recipe, its batches, what it continues, what its
manifest records) and calls `run_training`; the stage module itself only parses flags and wires.
Started again on the same output directory, the run resumes from its last complete checkpoint;
a killed run leaves no final manifest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from gramline.artifacts import MANIFEST
from gramline.config import dump_config
from gramline.data.reader import DatasetInfo, open_dataset
from gramline.errors import InputError
from gramline.io import atomic_path
from gramline.train import distributed
from gramline.train.checkpoint import latest_checkpoint, read_meta
from gramline.train.config import TrainConfig
from gramline.train.distributed import DistEnv
from gramline.train.export import lean_export, list_teacher_checkpoints, thin_teacher_checkpoints
from gramline.train.loggers import MLFLOW_RUN_FILE, TENSORBOARD_DIR
from gramline.train.loop import METRICS_FILE, LoopSettings, TrainLoop
from gramline.train.recipe import Recipe
from gramline.train.state_sync import BackgroundMirror, StateSync

StepHook = Callable[[Any, int], None]  # (recipe, step count) after every step: tests interrupt runs with it


@dataclass
class TakeOver:
    """Continue another run: load these parts, its step, RNG and NaN streak (unless this stage has
    checkpoints of its own), then tell the recipe where its phase starts."""

    run_dir: Path
    parts: Sequence[str]
    flag: str
    begin: Callable[[int, Path], None]


@dataclass
class TrainingRun:
    stage: str
    config: BaseModel  # has `train` (TrainConfig) and `backbone`/`heads` sections
    dataset: Path
    out_dir: Path
    recipe: Recipe
    batches: Callable[[DatasetInfo, DistEnv], Callable[[int], Iterator[Any]]]
    inputs: list[dict[str, Any]]  # lineage entries of the manifest
    record: Callable[[], dict[str, Any]] = dict  # extra manifest entries, read at export time
    take_over: TakeOver | None = None
    hooks: Sequence[StepHook] = ()
    periodic_exports: bool = True  # teacher Model artifacts under checkpoints/ (TrainConfig.teacher_every)
    frozen_sections: Sequence[str] = ("backbone", "heads")  # config sections a resume must not change
    state_uri: str = ""  # --state-uri: checkpoints mirrored where they outlive the pod (gramline.train.state_sync)
    artifact: bool = False  # the output is a pipeline task's Model (--executor-output): see ExportConfig

    @property
    def train(self) -> TrainConfig:
        return self.config.train  # type: ignore[attr-defined]


@dataclass(frozen=True)
class TrainingResult:
    manifest: dict[str, Any]
    metadata: dict[str, Any]  # the executor output's metadata of the Model artifact
    tensorboard_dir: Path | None = None  # the event files' directory inside the Model, when TensorBoard logs


def check_resume_compatible(out_dir: Path, config: BaseModel,
                            frozen_sections: Sequence[str] = ("backbone", "heads")) -> None:
    """Refuse to resume a run whose architecture differs from the requested one (reads only the
    checkpoint's small meta.json, not its weights)."""
    path = latest_checkpoint(out_dir / "state")
    saved = read_meta(path).get("config") if path is not None else None
    if not saved:
        return
    now = dump_config(config)
    for section in frozen_sections:
        if saved.get(section) != now.get(section):
            raise InputError(f"--out-model {out_dir}", f"holds a run with a different {section} config "
                             f"({saved.get(section)} vs {now.get(section)})",
                             "a fresh output directory, or the same architecture to resume")


def final_metrics(log: Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
    return {f"final_{k}": float(log[k]) for k in ("total", *names) if k in log}


MIRROR_STAGING = ".state-mirror"  # under the output: the snapshots BackgroundMirror uploads


def run_files(out_dir: Path) -> list[Path]:
    """The small files of a run that a retry on a new pod needs besides its checkpoint."""
    return [out_dir / METRICS_FILE, out_dir / MLFLOW_RUN_FILE]


def run_training(run: TrainingRun) -> TrainingResult | None:
    """Train and export; the result on the main process, None on the others. With a state location,
    an empty `<out>/state/` is first filled from it, and every checkpoint is mirrored there."""
    sync = StateSync(run.state_uri) if run.state_uri else None
    info = open_dataset(run.dataset)
    info.shard_counts("train")  # fails early, naming the dataset, when the train split is empty
    check_resume_compatible(run.out_dir, run.config, run.frozen_sections)
    env = distributed.setup()
    try:
        if sync is not None:
            if env.is_main and latest_checkpoint(run.out_dir / "state") is None:
                sync.restore(run.out_dir / "state", run_files(run.out_dir), run.out_dir / "checkpoints")
            distributed.barrier()  # the other ranks read what the main one restored
            check_resume_compatible(run.out_dir, run.config, run.frozen_sections)
        return _train(run, info, env, sync)
    finally:
        distributed.teardown()


def _train(run: TrainingRun, info: DatasetInfo, env: DistEnv, sync: StateSync | None) -> TrainingResult | None:
    out_dir, recipe = run.out_dir, run.recipe
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = run.batches(info, env)
    loop = TrainLoop(recipe, batches, env, out_dir, LoopSettings.of(run.train),
                     images_per_step=run.train.batch_size * env.world_size,
                     meta={"config": dump_config(run.config)},
                     callbacks=[lambda step, hook=hook: hook(recipe, step) for hook in run.hooks])
    # rank 0 mirrors each checkpoint on a thread while the ranks train on
    mirror = BackgroundMirror(sync, out_dir / MIRROR_STAGING) if sync is not None and env.rank == 0 else None
    if mirror is not None:
        loop.checkpointer.on_saved = lambda path: mirror.submit(
            path, run_files(out_dir), [export for _, export in list_teacher_checkpoints(out_dir)])
    every = run.train.teacher_every() if run.periodic_exports else 0
    if every:  # on every rank: under FSDP2 the export gathers the teacher collectively
        loop.callbacks.append(lambda step: _teacher_checkpoint(run, loop, env, step) if step % every == 0 else None)
    resumed = loop.resume()
    if not resumed and run.take_over is not None:
        take = run.take_over
        path = loop.take_over(take.run_dir / "state", take.parts, take.flag)
        take.begin(loop.step, path)
    try:
        log = loop.run()
    except BaseException:
        if mirror is not None:  # the last checkpoint still goes up for the retry; the failure is what counts
            with contextlib.suppress(Exception):
                mirror.close()
        raise
    if mirror is not None:
        mirror.close()
    if env.is_main:
        (out_dir / MANIFEST).unlink(missing_ok=True)
    metrics = final_metrics(log, recipe.loss_names)
    manifest = recipe.export(out_dir, loop.step, metrics, {"inputs": run.inputs, "resumed": resumed, **run.record()})
    if manifest is None:
        return None
    metadata = {"step": loop.step, **metrics}
    if "timm" in manifest:
        metadata |= {"timm_model": manifest["timm"]["name"], "arch": manifest["arch"]}
        how = f"; load with gramline.models.io.load_backbone or timm {manifest['timm']['name']}"
    else:
        how = ""
    dropped = lean_export(out_dir, run.stage, run.train.export, run.artifact)
    if dropped:
        how += f"; without {' and '.join(f'{name}/' for name in dropped)} (train.export)"
    print(f"[{run.stage}] model written to {out_dir} (step {loop.step}{how})", flush=True)
    events = out_dir / TENSORBOARD_DIR
    return TrainingResult(manifest, metadata, events if run.train.loggers.tensorboard and events.is_dir() else None)


def _teacher_checkpoint(run: TrainingRun, loop: TrainLoop, env: DistEnv, step: int) -> None:
    """A complete Model artifact of the teacher at `step` under checkpoints/ (the anchor stage picks
    one), written by the main rank; the others only take part in the export's gather."""
    metrics = final_metrics(loop.last_log, run.recipe.loss_names)
    record = {"inputs": run.inputs, "checkpoint_of": str(run.out_dir)}
    if not env.is_main:
        run.recipe.export(run.out_dir, step, metrics, record)  # writes nothing off the main rank
        return
    final = run.out_dir / "checkpoints" / f"teacher-{step:08d}"
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        run.recipe.export(tmp, step, metrics, record)
    thin_teacher_checkpoints(run.out_dir, run.train.keep_teacher_checkpoints)

