"""Where a run's logged records go besides metrics.jsonl: TensorBoard event files in the output Model
directory and, when `train.loggers.mlflow_uri` is set, an MLflow run.

Only the main rank opens them. A resumed run logs the steps after its checkpoint again; TensorBoard
hides the first attempt's values of those steps (the new event file starts with a purge marker),
and MLflow continues the same run (its id is kept in the Model directory). A run resumed on a new
pod, whose state came back from the state location with metrics.jsonl but without the first
attempt's event files, writes that file's records up to its checkpoint into the new event file first,
so the TensorBoard curve still starts at step 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from gramline.train.config import LoggersConfig

TENSORBOARD_DIR = "tensorboard"
MLFLOW_RUN_FILE = "mlflow_run_id"


class Sink(Protocol):
    def write(self, step: int, record: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """One scalar per logged value, tagged with its name, at the step it was logged; flushed at
    every write, so that a TensorBoard reading the directory sees the run as it goes."""

    def __init__(self, log_dir: Path, start_step: int, history: Path | None = None) -> None:
        """`history`: the run's metrics.jsonl, replayed up to `start_step` when `log_dir` holds no events."""
        from torch.utils.tensorboard import SummaryWriter

        earlier = start_step > 0 and history is not None and history.is_file() and not (
            log_dir.is_dir() and any(log_dir.glob("events.out.tfevents.*")))
        # events of a previous attempt at steps > start_step are hidden (TensorBoard's purge_step)
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1)
        if earlier:
            for line in history.read_text().splitlines():
                record = json.loads(line) if line.strip() else {}
                if 0 < record.get("step", 0) <= start_step:
                    self.write(int(record["step"]), record)

    def write(self, step: int, record: Mapping[str, float]) -> None:
        for name, value in record.items():
            if name != "step":
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowSink:
    """An MLflow run named after the stage, in the experiment MLFLOW_EXPERIMENT_NAME (default: gramline)."""

    def __init__(self, tracking_uri: str, run_dir: Path, run_name: str) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or "gramline")  # created if missing
        id_file = run_dir / MLFLOW_RUN_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
        id_file.write_text(self.run.info.run_id + "\n")

    def write(self, step: int, record: Mapping[str, float]) -> None:
        self.mlflow.log_metrics({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def open_sinks(config: LoggersConfig | None, out_dir: Path, run_name: str, start_step: int,
               history: Path | None = None) -> list[Sink]:
    """The sinks `config` asks for (None: none), writing under the output directory `out_dir`;
    `history` is the run's metrics.jsonl (see TensorBoardSink)."""
    if config is None:
        return []
    sinks: list[Sink] = []
    if config.tensorboard:
        sinks.append(TensorBoardSink(out_dir / TENSORBOARD_DIR, start_step, history))
    if config.mlflow_uri:
        sinks.append(MlflowSink(config.mlflow_uri, out_dir, run_name))
    return sinks
