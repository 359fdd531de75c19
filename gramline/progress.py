"""The one progress printer of every long job (curation, training, scoring, benchmarks, data writing).

    [curate] ingest: 2048/10000 (quarantined 3) | 812.4 img/s | ETA 0:09
    [pretrain] step 50/200 total=6.1 lr=0.002 | 3.81 steps/s 122 img/s data-wait 27% | ETA 0:39

A line is `[prefix] what: done/total (counts) fields | rate unit/s extra | ETA`. `update` prints at
most every `every_s` seconds unless forced; the rate is measured since the last `reset` (training
resets it at each log line, so its rate is the recent one).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import TextIO


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_value(value: float) -> str:
    return f"{value:.4g}"


class Progress:
    def __init__(self, prefix: str, what: str = "", total: int | None = None, unit: str = "items",
                 every_s: float = 5.0, stream: TextIO | None = None, start_at: int = 0,
                 enabled: bool = True) -> None:
        self.prefix, self.what, self.total, self.unit = prefix, what, total, unit
        self.every_s, self.enabled = every_s, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.done = start_at
        self.printed_at: int | None = None
        self._start = self._last = time.perf_counter()
        self._rate_from = (self._start, start_at)

    def reset(self) -> None:
        """Measure the rate from here (training: from the previous log line)."""
        self._rate_from = (time.perf_counter(), self.done)

    def rate(self) -> float:
        since, done_then = self._rate_from
        return (self.done - done_then) / max(time.perf_counter() - since, 1e-9)

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def update(self, done: int, counts: Mapping[str, int] | None = None, fields: Mapping[str, float] | None = None,
               extra: str = "", force: bool = False) -> bool:
        """Record progress; print a line when forced or `every_s` passed. Returns whether it printed."""
        self.done = done
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._last < self.every_s):
            return False
        self._last = now
        self.printed_at = done
        print(self.line(counts, fields, extra), file=self.stream, flush=True)
        return True

    def line(self, counts: Mapping[str, int] | None = None, fields: Mapping[str, float] | None = None,
             extra: str = "") -> str:
        rate = self.rate()
        what = f" {self.what}:" if self.what else ""
        of = f"/{self.total}" if self.total else ""
        counted = f" ({', '.join(f'{k} {v}' for k, v in counts.items())})" if counts else ""
        shown = "".join(f" {k}={format_value(v)}" for k, v in (fields or {}).items())
        eta = f" | ETA {format_eta((self.total - self.done) / rate)}" if self.total and rate > 0 else ""
        extra = f" {extra}" if extra else ""
        return f"[{self.prefix}]{what} {self.done}{of}{counted}{shown} | {rate:.3g} {self.unit}/s{extra}{eta}"

    def finish(self, counts: Mapping[str, int] | None = None) -> float:
        """Print the last line if the last update was not printed; the seconds since the start."""
        if self.printed_at != self.done:
            self.update(self.done, counts, force=True)
        return self.elapsed()
