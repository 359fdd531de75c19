"""Progress lines (loss terms, steps/s, images/s, data-wait %, ETA) and `metrics.jsonl`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Mapping, TextIO


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressLog:
    """Accumulates timing between log lines; `data_wait` is time blocked on the data loader."""

    def __init__(self, total_steps: int, images_per_step: int, metrics_path: Path | None, enabled: bool = True,
                 stream: TextIO = sys.stdout, prefix: str = "train") -> None:
        self.total_steps = total_steps
        self.images_per_step = images_per_step
        self.metrics_path = metrics_path
        self.enabled = enabled
        self.stream = stream
        self.prefix = prefix
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self._window_data = 0.0
        self._start = self._window_start

    def add_step(self, data_seconds: float) -> None:
        self._window_steps += 1
        self._window_data += data_seconds

    def emit(self, step: int, values: Mapping[str, float]) -> dict:
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        steps_per_s = self._window_steps / elapsed
        record = {
            "step": step,
            **{k: float(v) for k, v in values.items()},
            "steps_per_s": steps_per_s,
            "images_per_s": steps_per_s * self.images_per_step,
            "data_wait_pct": 100.0 * self._window_data / elapsed,
            "elapsed_s": now - self._start,
        }
        remaining = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else 0.0
        if self.enabled:
            terms = " ".join(f"{k}={v:.4g}" for k, v in values.items())
            print(
                f"[{self.prefix}] step {step}/{self.total_steps} {terms} | {steps_per_s:.2f} steps/s "
                f"{record['images_per_s']:.1f} img/s data-wait {record['data_wait_pct']:.0f}% "
                f"ETA {format_eta(remaining)}",
                file=self.stream, flush=True,
            )
            if self.metrics_path is not None:
                with open(self.metrics_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
        self._window_start, self._window_steps, self._window_data = now, 0, 0.0
        return record
