"""Curation's one-off log lines, `[curate] message` on stderr (progress lines: gramline.progress)."""

from __future__ import annotations

import sys


def log(message: str) -> None:
    print(f"[curate] {message}", file=sys.stderr, flush=True)
