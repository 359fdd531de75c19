"""A run's log: a progress line every `log_every` steps and one JSON record per line in `metrics.jsonl`,
also handed to the configured sinks (TensorBoard, MLflow: gramline.train.loggers).

The line shows the recipe's chosen values, steps/s, images/s, the share of time spent waiting for
data and the ETA; the record holds every logged value of that step (losses, weighted terms,
schedule values) and the same timings.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

from gramline.progress import Progress
from gramline.train.loggers import Sink


class MetricsLog:
    def __init__(self, prefix: str, start_step: int, last_step: int, images_per_step: int, path: Path | None,
                 shown: Sequence[str], enabled: bool = True, stream: TextIO | None = None,
                 sinks: Sequence[Sink] = ()) -> None:
        """`sinks` get every record while enabled and are closed once `last_step` is logged."""
        self.progress = Progress(prefix, "step", total=last_step, unit="steps", start_at=start_step,
                                 stream=stream if stream is not None else sys.stdout, enabled=enabled)
        self.last_step = last_step
        self.images_per_step = images_per_step
        self.path = path
        self.shown = list(shown)
        self.enabled = enabled
        self.sinks = list(sinks)
        self._data_seconds = 0.0
        self._window_start = time.perf_counter()

    def add_step(self, data_seconds: float) -> None:
        self._data_seconds += data_seconds

    def emit(self, step: int, values: Mapping[str, float]) -> dict[str, float]:
        """Print the line for `step` and append its record; the rates cover the steps since the last one."""
        self.progress.done = step
        steps_per_s = self.progress.rate()
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        record = {"step": step, **{k: float(v) for k, v in values.items()},
                  "steps_per_s": steps_per_s, "images_per_s": steps_per_s * self.images_per_step,
                  "data_wait_pct": 100.0 * self._data_seconds / elapsed, "elapsed_s": self.progress.elapsed()}
        if self.enabled:
            shown = {k: float(values[k]) for k in self.shown if k in values}
            rates = f"{record['images_per_s']:.1f} img/s data-wait {record['data_wait_pct']:.0f}%"
            self.progress.update(step, fields=shown, extra=rates, force=True)
            if self.path is not None:
                with open(self.path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            for sink in self.sinks:
                sink.write(step, record)
            if step >= self.last_step:
                self.close()
        self.progress.reset()
        self._data_seconds, self._window_start = 0.0, time.perf_counter()
        return record

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records after `step` (a resumed run logs those steps again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))
