"""A training run's state on storage that outlives the pod: `--state-uri` (a PVC directory or s3://).

A KFP output `.path` lives on the pod's own disk, and the launcher uploads outputs only after a task
succeeded, so a retried task used to start on an empty output directory, from step 0. With a state
location (one per run and task: `<root>/<run id>/<stage>`) every checkpoint is mirrored there, and a
start whose `<out>/state/` is empty reads the latest one back first, so the run resumes from it.

Layout of the location:
    step-XXXXXXXX/...  the files of one checkpoint directory (gramline.train.checkpoint): the
                       weights, optimizer and every rank's RNG state; rank 0 mirrors the directory,
                       which holds every rank's files once the checkpoint is complete
    exports/NAME/...   the run's teacher checkpoints (Model artifacts under <out>/checkpoints/, which
                       the anchor stage chooses among) when that checkpoint was taken
    metrics.jsonl      the run's metrics log when that checkpoint was taken, and beside it the other
                       small run files named in push (the MLflow run id), so that a retry on a new pod
                       continues the same curves
    latest.json        {"step", "dir", "files": {name: size}, "exports"}: written last (a local file is renamed
                       into place, an S3 PUT is atomic), and a reader goes only by it, so it never
                       sees a partial checkpoint; what it no longer names is deleted after it
    verdict.json       left by an attempt that failed on bad input (exit 2): the next attempt exits 2
                       at once (Argo's retryStrategy as KFP compiles it cannot skip an exit code)
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from gramline.data import s3
from gramline.errors import InputError, TransientError
from gramline.io import atomic_path, link_or_copy, write_bytes_atomic
from gramline.train.checkpoint import MODEL_FILE, STEP_DIR

POINTER = "latest.json"
VERDICT = "verdict.json"
EXPORTS = "exports"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
FLAG = "--state-uri"
EXPECTED = "a directory on a mounted PVC or s3://bucket/prefix"


def _listing(directory: Path) -> dict[str, int]:
    """Every file under `directory` (relative POSIX path) with its size."""
    return {p.relative_to(directory).as_posix(): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def _listing_ok(files: Any) -> bool:
    return isinstance(files, dict) and all(
        isinstance(n, str) and isinstance(size, int) and not n.startswith("/") and ".." not in n.split("/")
        for n, size in files.items())


class _Store(Protocol):
    def read(self, name: str) -> bytes | None: ...

    def write(self, name: str, data: bytes) -> None: ...

    def put_dir(self, name: str, source: Path) -> None: ...

    def get_file(self, name: str, target: Path) -> None: ...

    def dirs(self, under: str = "") -> set[str]: ...

    def remove_dir(self, name: str) -> None: ...


class _LocalStore:
    """A directory (a PVC mount): a step directory is copied under a temp name and renamed."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, name: str) -> bytes | None:
        path = self.root / name
        return path.read_bytes() if path.is_file() else None

    def write(self, name: str, data: bytes) -> None:
        write_bytes_atomic(self.root / name, data)

    def put_dir(self, name: str, source: Path) -> None:
        with atomic_path(self.root / name) as tmp:
            shutil.copytree(source, tmp)

    def get_file(self, name: str, target: Path) -> None:
        shutil.copyfile(self.root / name, target)

    def dirs(self, under: str = "") -> set[str]:
        folder = self.root / under
        return {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()

    def remove_dir(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)


class _S3Store:
    """An s3:// prefix, through gramline.data.s3 (retries, and its error contract)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")

    def _url(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def read(self, name: str) -> bytes | None:
        url = self._url(name)
        return s3.read_bytes(url, "state") if s3.exists(url, "state") else None

    def write(self, name: str, data: bytes) -> None:
        s3.put_bytes(self._url(name), data, "state")

    def put_dir(self, name: str, source: Path) -> None:
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            s3.upload_file(path, self._url(f"{name}/{path.relative_to(source).as_posix()}"), "state")

    def get_file(self, name: str, target: Path) -> None:
        with s3.open_object(self._url(name), "state") as body, open(target, "wb") as out:
            shutil.copyfileobj(body, out, 16 << 20)

    def dirs(self, under: str = "") -> set[str]:
        url = self._url(under) if under else self.uri
        prefix = s3.folder_prefix(s3.split_url(url)[1])
        return {rest.split("/", 1)[0] for key, _ in s3.list_objects(url, "state")
                if "/" in (rest := key[len(prefix):])}

    def remove_dir(self, name: str) -> None:
        s3.delete_prefix(self._url(name), "state")


class StateSync:
    """Mirror checkpoints to `uri` and read the latest one back; record and honour bad-input verdicts."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        if s3.is_s3_url(uri):
            if not uri[len("s3://"):].partition("/")[0]:
                raise InputError(f"{FLAG} {uri!r}", "names no bucket", EXPECTED)
            self.store: _Store = _S3Store(uri)
        elif "://" in uri or not Path(uri).is_absolute():
            raise InputError(f"{FLAG} {uri!r}", "is neither an absolute path nor an s3:// URL", EXPECTED)
        else:
            self.store = _LocalStore(Path(uri))

    @contextlib.contextmanager
    def _local_errors(self, doing: str) -> Iterator[None]:
        """A local location that cannot be read or written is a deployment error (exit 2)."""
        try:
            yield
        except OSError as err:
            raise InputError(f"{FLAG} {self.uri}", f"cannot be used ({doing}: {err})", EXPECTED) from err

    def pointer(self) -> dict[str, Any] | None:
        """The latest complete checkpoint's record, or None when nothing was mirrored yet."""
        with self._local_errors("reading"):
            data = self.store.read(POINTER)
        if data is None:
            return None
        try:
            record = json.loads(data)
            exports = record.get("exports", {})
            ok = (STEP_DIR.match(record["dir"]) is not None and MODEL_FILE in record["files"]
                  and _listing_ok(record["files"]) and isinstance(exports, dict)
                  and all(_NAME.fullmatch(name) and _listing_ok(files) for name, files in exports.items()))
        except (ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise InputError(f"{FLAG} {self.uri}", f"has a malformed {POINTER}",
                             'the pointer gramline writes: {"step", "dir", "files", "exports"}')
        return record

    def push(self, checkpoint: Path, files: Sequence[Path] = (), exports: Sequence[Path] = ()) -> None:
        """Mirror the complete checkpoint directory `checkpoint`, the small run `files` that exist (the
        metrics log so far, ...: each under its name) and the complete directories `exports` (teacher
        checkpoints: each uploaded once, dropped when no longer listed). S3 or the network still failing after the retries: a warning, and training goes on
        (the next checkpoint tries again); a permanent failure is an InputError."""
        step = int(STEP_DIR.match(checkpoint.name).group(1))  # type: ignore[union-attr]
        done = (self.pointer() or {}).get("exports", {})
        record = {"step": step, "dir": checkpoint.name, "files": _listing(checkpoint),
                  "exports": {path.name: done.get(path.name) or _listing(path) for path in exports}}
        try:
            with self._local_errors("writing"):
                self.store.put_dir(checkpoint.name, checkpoint)
                for path in exports:
                    if path.name not in done:
                        self.store.put_dir(f"{EXPORTS}/{path.name}", path)
                for path in files:
                    if path.is_file():
                        self.store.write(path.name, path.read_bytes())
                self.store.write(POINTER, json.dumps(record).encode())
                for old in self.store.dirs() - {checkpoint.name, EXPORTS}:  # older checkpoints, stale temps
                    self.store.remove_dir(old)
                for old in self.store.dirs(EXPORTS) - set(record["exports"]):
                    self.store.remove_dir(f"{EXPORTS}/{old}")
        except TransientError as err:
            print(f"warning: checkpoint step {step} not mirrored to {self.uri}: {err}", file=sys.stderr, flush=True)
            return
        print(f"[state] checkpoint step {step} mirrored to {self.uri}", flush=True)

    def restore(self, state_dir: Path, files: Sequence[Path] = (), exports: Path | None = None) -> int | None:
        """Read the latest mirrored checkpoint into `state_dir`, the mirrored run files to the `files`
        of the same names and the exports into the directory `exports`; its step, or None when there is
        none."""
        record = self.pointer()
        if record is None:
            return None
        self._fetch(record["dir"], record["files"], state_dir / record["dir"])
        for name, listing in record.get("exports", {}).items() if exports is not None else ():
            if not (exports / name).exists():
                self._fetch(f"{EXPORTS}/{name}", listing, exports / name)
        for path in files:
            with self._local_errors("reading"):
                data = self.store.read(path.name)
            if data is not None:
                write_bytes_atomic(path, data)
        print(f"[state] restored {record['dir']} from {self.uri} into {state_dir}", flush=True)
        return int(record["step"])

    def _fetch(self, remote: str, files: dict[str, int], target: Path) -> None:
        """The files of the remote directory `remote` into the new directory `target`, sizes checked."""
        with self._local_errors("reading"), atomic_path(target) as tmp:
            tmp.mkdir(parents=True)
            for file, size in files.items():
                path = tmp / file
                path.parent.mkdir(parents=True, exist_ok=True)
                self.store.get_file(f"{remote}/{file}", path)
                if path.stat().st_size != size:
                    raise InputError(f"{FLAG} {self.uri}", f"holds {remote}/{file} of {path.stat().st_size} bytes, "
                                     f"its {POINTER} says {size}", "a location written only by this task")

    @contextlib.contextmanager
    def verdict_guard(self) -> Iterator[None]:
        """Exit 2 at once when an earlier attempt failed on bad input; record such a failure."""
        with self._local_errors("reading"):
            data = self.store.read(VERDICT)
        if data is not None:
            try:
                message = str(json.loads(data)["message"])
            except (ValueError, KeyError, TypeError):
                message = data.decode(errors="replace")
            raise InputError(f"{FLAG} {self.uri}", "records that an earlier attempt of this task failed on bad "
                             f"input, which a retry cannot fix: {message}",
                             f"a new run with corrected input (or delete {VERDICT} there)")
        try:
            yield
        except InputError as err:
            with contextlib.suppress(InputError, TransientError, OSError):  # the error itself is what counts
                self.store.write(VERDICT, json.dumps({"message": str(err)}).encode())
            raise


class BackgroundMirror:
    """Mirror checkpoints on a thread, so that the ranks go on training during the upload (minutes
    to S3 for a large model's checkpoint, which every rank used to wait for).

    `submit` takes a snapshot under `staging` (hard links of the checkpoint and export files, which
    are never rewritten, so the checkpointer may delete the originals meanwhile; copies of the run
    files, which grow) and returns. While one upload runs, only the newest checkpoint submitted
    waits: an older waiting one is dropped, since a retry reads only the newest. `close` waits for
    the last upload and removes `staging`. An upload's failure other than S3 still failing (a
    warning in StateSync.push) is raised by the next `submit` or by `close`.
    """

    def __init__(self, sync: StateSync, staging: Path) -> None:
        self.sync, self.staging = sync, staging
        self._cond = threading.Condition()
        self._waiting: Path | None = None
        self._closed = False
        self._error: BaseException | None = None
        shutil.rmtree(staging, ignore_errors=True)  # what a killed run left
        self._thread = threading.Thread(target=self._run, name="state-mirror", daemon=True)
        self._thread.start()

    def submit(self, checkpoint: Path, files: Sequence[Path] = (), exports: Sequence[Path] = ()) -> None:
        self._raise()
        snapshot = self.staging / checkpoint.name
        shutil.rmtree(snapshot, ignore_errors=True)
        shutil.copytree(checkpoint, snapshot / "checkpoint" / checkpoint.name, copy_function=link_or_copy)
        for path in exports:
            shutil.copytree(path, snapshot / EXPORTS / path.name, copy_function=link_or_copy)
        (snapshot / "files").mkdir()
        for path in files:
            if path.is_file():
                shutil.copy2(path, snapshot / "files" / path.name)
        with self._cond:
            dropped, self._waiting = self._waiting, snapshot
            self._cond.notify_all()
        if dropped is not None and dropped != snapshot:
            shutil.rmtree(dropped, ignore_errors=True)

    def close(self) -> None:
        """Wait for the last upload, remove the staging directory, raise an upload's failure."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        shutil.rmtree(self.staging, ignore_errors=True)
        self._raise()

    def _raise(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._waiting is None and not self._closed:
                    self._cond.wait()
                if self._waiting is None:
                    return
                snapshot, self._waiting = self._waiting, None
            try:
                exports = snapshot / EXPORTS
                self.sync.push(next((snapshot / "checkpoint").iterdir()), sorted((snapshot / "files").iterdir()),
                               sorted(exports.iterdir()) if exports.is_dir() else [])
            except BaseException as err:  # noqa: BLE001 - handed to the training thread
                self._error = err
            finally:
                shutil.rmtree(snapshot, ignore_errors=True)
