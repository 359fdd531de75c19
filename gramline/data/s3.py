"""S3 through boto3: list, read (streaming, resumable on broken connections), write, copy, delete.

The endpoint comes from the standard AWS settings (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_S3`),
which boto3 reads itself; credentials from the usual environment or profile. API calls retry with
botocore's adaptive mode (exponential backoff with jitter); a body read that breaks mid-stream is
re-opened with a byte range from where it stopped, with its own backoff.
"""

from __future__ import annotations

import io
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

import boto3
import botocore.exceptions
from botocore.config import Config

from gramline.errors import InputError

T = TypeVar("T")

MAX_ATTEMPTS = 8
_RETRY_CONFIG = Config(retries={"max_attempts": MAX_ATTEMPTS, "mode": "adaptive"},
                       connect_timeout=10, read_timeout=60, max_pool_connections=32)
_TRANSIENT_READ_ERRORS = (
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.EndpointConnectionError,
    ConnectionError,
    TimeoutError,
)
_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}

_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()


def is_s3_url(url: str) -> bool:
    return url.startswith("s3://")


def split_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/key` → ("bucket", "some/key"); the key may be empty (a whole bucket)."""
    if not is_s3_url(url):
        raise InputError(f"URL {url!r}", "is not an s3:// URL", "s3://bucket/key")
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise InputError(f"URL {url!r}", "has no bucket name", "s3://bucket/key")
    return bucket, key


def client() -> Any:
    """A boto3 S3 client for the current process and endpoint settings (clients are thread-safe)."""
    ident = (os.getpid(), os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ENDPOINT_URL_S3"),
             os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_DEFAULT_REGION"))
    with _clients_lock:
        if ident not in _clients:
            _clients[ident] = boto3.session.Session().client("s3", config=_RETRY_CONFIG)
        return _clients[ident]


def _error_code(err: Exception) -> str:
    if isinstance(err, botocore.exceptions.ClientError):
        return str(err.response.get("Error", {}).get("Code", ""))
    return ""


def _explain(err: Exception, url: str, what: str) -> InputError:
    """Turn a boto3 failure into an InputError that names the URL and the problem."""
    code = _error_code(err)
    if code == "NoSuchBucket":
        return InputError(f"{what} {url}", "names a bucket that does not exist", "an existing S3 bucket")
    if code in _NOT_FOUND:
        return InputError(f"{what} {url}", "does not exist", "an existing S3 object")
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return InputError(f"{what} {url}", f"is not accessible ({code})", "readable S3 credentials")
    if isinstance(err, botocore.exceptions.NoCredentialsError):
        return InputError(f"{what} {url}", "cannot be read: no AWS credentials found",
                          "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile")
    if isinstance(err, botocore.exceptions.EndpointConnectionError):
        return InputError(f"{what} {url}", f"cannot reach the S3 endpoint ({err})",
                          "a reachable endpoint (AWS_ENDPOINT_URL)")
    return InputError(f"{what} {url}", f"failed: {err}")


def _with_backoff(fn: Callable[[], T], attempts: int = MAX_ATTEMPTS, base_s: float = 0.2) -> T:
    """Retry transient read failures (which botocore's own retries do not cover) with jittered backoff."""
    for attempt in range(attempts):
        try:
            return fn()
        except _TRANSIENT_READ_ERRORS:
            if attempt == attempts - 1:
                raise
            time.sleep(base_s * (2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def list_objects(url: str, what: str = "source") -> list[tuple[str, int]]:
    """All (key, size) under an s3:// prefix, sorted by key; directory markers skipped."""
    bucket, prefix = split_url(url)
    out: list[tuple[str, int]] = []
    try:
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):
                    out.append((obj["Key"], int(obj["Size"])))
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
        raise _explain(err, url, what) from err
    out.sort()
    return out


def read_bytes(url: str, what: str = "object") -> bytes:
    bucket, key = split_url(url)

    def fetch() -> bytes:
        return client().get_object(Bucket=bucket, Key=key)["Body"].read()

    try:
        return _with_backoff(fetch)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
        raise _explain(err, url, what) from err


def exists(url: str) -> bool:
    bucket, key = split_url(url)
    try:
        client().head_object(Bucket=bucket, Key=key)
        return True
    except botocore.exceptions.ClientError as err:
        if _error_code(err) in _NOT_FOUND:
            return False
        raise _explain(err, url, "object") from err


def object_size(url: str) -> int:
    bucket, key = split_url(url)
    try:
        return int(client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
        raise _explain(err, url, "object") from err


class _ObjectReader(io.RawIOBase):
    """A forward-streaming raw reader of one object that re-opens with `Range` after a broken read."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.bucket, self.key = split_url(url)
        self.pos = 0
        self.size: int | None = None
        self._body: Any = None
        self._open()

    def _open(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if self.pos:
            kwargs["Range"] = f"bytes={self.pos}-"
        try:
            response = _with_backoff(lambda: client().get_object(**kwargs))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
            raise _explain(err, self.url, "shard") from err
        if self.size is None:
            self.size = int(response.get("ContentLength", 0))
        self._body = response["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.size is not None and self.pos >= self.size:
            return 0
        view = memoryview(buffer).cast("B")
        for attempt in range(MAX_ATTEMPTS):
            try:
                chunk = self._body.read(len(view))
                break
            except _TRANSIENT_READ_ERRORS:
                if attempt == MAX_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 * (2**attempt) * (0.5 + random.random()))
                self._open()  # resume from self.pos with a byte range
        n = len(chunk)
        view[:n] = chunk
        self.pos += n
        return n

    def close(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None
        super().close()


def open_object(url: str, buffer_size: int = 1 << 20) -> BinaryIO:
    """A buffered, forward-only binary stream of an s3:// object (for WebDataset and tar readers)."""
    return io.BufferedReader(_ObjectReader(url), buffer_size=buffer_size)  # type: ignore[return-value]


def put_bytes(url: str, data: bytes) -> None:
    bucket, key = split_url(url)
    try:
        client().put_object(Bucket=bucket, Key=key, Body=data)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
        raise _explain(err, url, "output") from err


def upload_file(path: str | os.PathLike[str], url: str) -> None:
    bucket, key = split_url(url)
    try:
        client().upload_file(str(path), bucket, key)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
            boto3.exceptions.S3UploadFailedError) as err:
        raise _explain(err, url, "output") from err


def copy(src: str, dst: str) -> None:
    """Server-side copy (no download)."""
    sbucket, skey = split_url(src)
    dbucket, dkey = split_url(dst)
    try:
        client().copy({"Bucket": sbucket, "Key": skey}, dbucket, dkey)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
        raise _explain(err, dst, "output") from err


def delete_prefix(url: str) -> int:
    """Delete every object under an s3:// prefix; returns how many were deleted."""
    bucket, _prefix = split_url(url)
    keys = [key for key, _ in list_objects(url, "output")]
    for start in range(0, len(keys), 1000):
        batch = [{"Key": key} for key in keys[start:start + 1000]]
        client().delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    return len(keys)
