"""Atomic file and directory writes: a reader never sees a partial shard, checkpoint or manifest."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temp path next to `final`; on success fsync it and rename it into place.

    Works for files and for directories (the caller creates whichever it needs at the temp path).
    On an exception the temp path is removed and `final` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp.rmdir()
    try:
        yield tmp
        if tmp.is_dir():
            for root, _dirs, files in os.walk(tmp):
                for name in files:
                    with open(os.path.join(root, name), "rb") as fh:
                        os.fsync(fh.fileno())
            if final.exists():
                old = final.with_name(f".{final.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        else:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def current_umask() -> int:
    """This process's umask, read without changing it where the kernel reports it (Linux)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_file_mode(path: Path | str) -> None:
    """Give a file the mode an ordinary `open()` would (0666 less the umask): some writers, such as
    safetensors, create files 0600, which would hide weights from the other readers of an artifact."""
    os.chmod(path, 0o666 & ~current_umask())


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path | str, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def emptied_dir(path: Path | str) -> Path:
    """`path` as an empty directory: created, or its earlier contents removed (not the directory
    itself, which may be a mount point). For outputs written in place, manifest last."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return path


def remove_stale_temps(directory: Path | str) -> None:
    """Delete temp names left by an interrupted atomic write (`.<name>.*.tmp`)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name.startswith(".") and (entry.name.endswith(".tmp") or entry.name.endswith(".old")):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def link_or_copy(src: str, dst: str) -> None:
    """A hard link of `src` at `dst` (instant, and it outlives the removal of `src`), else a copy:
    `shutil.copytree(..., copy_function=link_or_copy)` for files that are never rewritten in place."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
