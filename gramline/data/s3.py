"""S3 through boto3: list, read (whole or streaming), write and delete, every call through `_call`.

The endpoint comes from the standard AWS settings (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_S3`),
credentials from the usual environment or profile. Failures come in two kinds:

- permanent (404, 403, bad credentials, other 4xx): an InputError naming the object and the
  operation; trying again cannot help.
- transient (5xx, throttling, connection resets, timeouts): retried, first by botocore in its
  "legacy" retry mode (the "standard" and "adaptive" modes keep one retry quota per client, which a
  long run under throttling drains, after which every call fails on its first error), then by
  `_call` with its own jittered exponential backoff. Still failing after that budget: a
  TransientError (exit 75) naming the operation and the object.

A streamed body that breaks or stalls mid-object is re-opened with a byte range from where it
stopped (`If-Match` its ETag, so a changed object is an error, never a splice of two versions).

Knobs, from the environment (`RetryPolicy.from_env`):
  GRAMLINE_S3_ATTEMPTS   our attempts per operation (default 8), each one botocore's retries
  GRAMLINE_S3_BACKOFF_S  first backoff (default 0.5 s), doubling per attempt up to 30 s, jittered
  GRAMLINE_S3_TIMEOUT_S  read timeout of one request (default 60 s; connecting: at most 10 s)
  AWS_MAX_ATTEMPTS       botocore's attempts per request (default 3)
"""

from __future__ import annotations

import functools
import io
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import boto3
import boto3.exceptions
import botocore.exceptions
import urllib3.exceptions
from botocore.config import Config

from gramline.errors import InputError, TransientError

T = TypeVar("T")

MAX_BACKOFF_S = 30.0
_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
_RETRYABLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestLimitExceeded",
                    "TooManyRequests", "ServiceUnavailable", "InternalError"}
_SERVICE_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
                   boto3.exceptions.S3UploadFailedError, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)
_TRANSIENT_ERRORS = (botocore.exceptions.HTTPClientError, botocore.exceptions.ConnectionError,
                     botocore.exceptions.IncompleteReadError, botocore.exceptions.FlexibleChecksumError,
                     urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8
    backoff_s: float = 0.5
    timeout_s: float = 60.0
    sdk_attempts: int = 3

    @classmethod
    def from_env(cls) -> RetryPolicy:
        def number(name: str, default: float, kind: type) -> Any:
            text = os.environ.get(name, "")
            try:
                value = kind(text) if text else default
            except ValueError:
                value = -1
            if value <= 0:
                raise InputError(f"environment variable {name}={text!r}", "is not a positive number",
                                 f"a positive {kind.__name__}")
            return value

        return cls(number("GRAMLINE_S3_ATTEMPTS", cls.attempts, int),
                   number("GRAMLINE_S3_BACKOFF_S", cls.backoff_s, float),
                   number("GRAMLINE_S3_TIMEOUT_S", cls.timeout_s, float),
                   number("AWS_MAX_ATTEMPTS", cls.sdk_attempts, int))

    def delay(self, failures: int) -> float:
        """Sleep after the `failures`-th failure in a row: exponential, capped, jittered to 50-100%."""
        return min(MAX_BACKOFF_S, self.backoff_s * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)


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


def folder_prefix(key: str) -> str:
    """The key prefix of the folder `key`: `raw` → `raw/` (so `raw2/...` is not in it); `` stays ``."""
    return key if not key or key.endswith("/") else key + "/"


def client() -> Any:
    """A boto3 S3 client for the current process and settings (clients are thread-safe)."""
    policy = RetryPolicy.from_env()
    ident = (os.getpid(), os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ENDPOINT_URL_S3"),
             os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_DEFAULT_REGION"), policy)
    with _clients_lock:
        if ident not in _clients:
            config = Config(retries={"mode": "legacy", "total_max_attempts": policy.sdk_attempts},
                            connect_timeout=min(10.0, policy.timeout_s), read_timeout=policy.timeout_s,
                            max_pool_connections=32)
            _clients[ident] = boto3.session.Session().client("s3", config=config)
        return _clients[ident]


def _error_code(err: BaseException) -> str:
    if isinstance(err, botocore.exceptions.ClientError):
        return str(err.response.get("Error", {}).get("Code", ""))
    return ""


def _cause(err: BaseException) -> BaseException:
    """boto3's upload failure wraps the error that caused it."""
    if isinstance(err, boto3.exceptions.S3UploadFailedError) and err.__context__ is not None:
        return err.__context__
    return err


def is_transient(err: BaseException) -> bool:
    """Whether trying again may succeed: 5xx, throttling, request timeouts, broken connections."""
    err = _cause(err)
    if isinstance(err, botocore.exceptions.ClientError):
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return status >= 500 or status in (408, 429) or _error_code(err) in _RETRYABLE_CODES
    return isinstance(err, _TRANSIENT_ERRORS)


def _describe(err: BaseException) -> str:
    err = _cause(err)
    if isinstance(err, botocore.exceptions.ClientError):
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{_error_code(err) or 'error'} (HTTP {status})"
    return f"{type(err).__name__}: {err}"


def _explain(err: BaseException, url: str, what: str, op: str) -> InputError:
    """A permanent boto3 failure as an InputError that names the object, the operation and the problem."""
    err = _cause(err)
    code = _error_code(err)
    where = f"{what} {url}"
    if code == "NoSuchBucket":
        return InputError(where, f"names a bucket that does not exist ({op})", "an existing S3 bucket")
    if code in _NOT_FOUND:
        return InputError(where, f"does not exist ({op})", "an existing S3 object")
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return InputError(where, f"is not accessible ({op}: {code})", "S3 credentials allowed to do this")
    if code in ("PreconditionFailed", "412"):
        return InputError(where, f"changed while it was being read ({op})", "objects that are not rewritten")
    if isinstance(err, botocore.exceptions.NoCredentialsError):
        return InputError(where, f"cannot be accessed: no AWS credentials found ({op})",
                          "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile")
    return InputError(where, f"{op} failed: {_describe(err)}")


def _give_up(op: str, url: str, failures: int, seconds: float, err: BaseException) -> TransientError:
    return TransientError(
        f"S3 {op} of {url} still failed after {failures} attempts over {seconds:.1f} s (last: {_describe(err)}); "
        "S3 or the network is unavailable: run the stage again, it continues where it stopped")


def _call(op: str, url: str, fn: Callable[[], T], what: str = "object",
          recover: Callable[[], None] | None = None) -> T:
    """Run one idempotent S3 operation `op` on `url`, retrying transient failures with backoff;
    `recover`, when given, runs after each backoff, before the retry (re-opening a broken stream)."""
    policy = RetryPolicy.from_env()
    start = time.monotonic()
    for failures in range(1, policy.attempts + 1):
        try:
            return fn()
        except _SERVICE_ERRORS as err:
            if not is_transient(err):
                raise _explain(err, url, what, op) from err
            if failures == policy.attempts:
                raise _give_up(op, url, failures, time.monotonic() - start, err) from err
            time.sleep(policy.delay(failures))
            if recover is not None:
                recover()
    raise AssertionError("unreachable")


def list_objects(url: str, what: str = "source") -> list[tuple[str, int]]:
    """All (key, size) in the folder `url` (`s3://b/raw` is `raw/`), sorted by key; directory
    markers skipped."""
    bucket, key = split_url(url)

    def listing() -> list[tuple[str, int]]:
        out = []
        pages = client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder_prefix(key))
        for page in pages:
            out += [(o["Key"], int(o["Size"])) for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        return sorted(out)

    return _call("list_objects_v2", url, listing, what)


def read_bytes(url: str, what: str = "object") -> bytes:
    """The whole object; a body cut short is retried (botocore checks its length)."""
    bucket, key = split_url(url)
    return _call("get_object", url, lambda: client().get_object(Bucket=bucket, Key=key)["Body"].read(), what)


def exists(url: str, what: str = "object") -> bool:
    bucket, key = split_url(url)

    def head() -> bool:
        try:
            client().head_object(Bucket=bucket, Key=key)
            return True
        except botocore.exceptions.ClientError as err:
            if _error_code(err) in _NOT_FOUND:
                return False
            raise

    return _call("head_object", url, head, what)


class _ObjectReader(io.RawIOBase):
    """A forward-streaming raw reader of one object that re-opens with `Range` after a broken read."""

    def __init__(self, url: str, what: str = "object") -> None:
        super().__init__()
        self.url, self.what = url, what
        self.bucket, self.key = split_url(url)
        self.pos = 0
        self.size: int | None = None
        self.etag: str | None = None
        self._body: Any = None
        self._open()

    def _open(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if self.pos:
            kwargs["Range"] = f"bytes={self.pos}-"
        if self.etag:
            kwargs["IfMatch"] = self.etag
        response = _call("get_object", self.url, lambda: client().get_object(**kwargs), self.what)
        if self.size is None:
            self.size = int(response.get("ContentLength", 0))
            self.etag = response.get("ETag")
        self._body = response["Body"]

    def _reopen(self) -> None:
        """After a broken read: resume from `pos` with a byte range (of the same ETag)."""
        self._body.close()
        self._open()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.size is not None and self.pos >= self.size:
            return 0
        view = memoryview(buffer).cast("B")
        chunk = _call("get_object (body)", self.url, lambda: self._body.read(len(view)), self.what,
                      recover=self._reopen)
        n = len(chunk)
        view[:n] = chunk
        self.pos += n
        return n

    def close(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None
        super().close()


def open_object(url: str, what: str = "object", buffer_size: int = 1 << 20) -> BinaryIO:
    """A buffered, forward-only binary stream of an s3:// object (for WebDataset and tar readers)."""
    return io.BufferedReader(_ObjectReader(url, what), buffer_size=buffer_size)  # type: ignore[return-value]


def put_bytes(url: str, data: bytes, what: str = "output") -> None:
    """Write one object (a PUT is atomic: readers see the old object or the new one)."""
    bucket, key = split_url(url)
    _call("put_object", url, lambda: client().put_object(Bucket=bucket, Key=key, Body=data), what)


def upload_file(path: str | os.PathLike[str], url: str, what: str = "output") -> None:
    bucket, key = split_url(url)
    _call("upload (put_object/multipart)", url, lambda: client().upload_file(str(path), bucket, key), what)


def delete(url: str, what: str = "output") -> None:
    """Delete one object (deleting a missing object is not an error)."""
    bucket, key = split_url(url)
    _call("delete_objects", url, lambda: _delete_batch(bucket, [key]), what)


def delete_prefix(url: str, what: str = "output") -> int:
    """Delete every object in the folder `url`; returns how many there were."""
    bucket, _ = split_url(url)
    keys = [key for key, _ in list_objects(url, what)]
    for start in range(0, len(keys), 1000):
        batch = keys[start:start + 1000]
        _call("delete_objects", f"s3://{bucket}/{batch[0]}", functools.partial(_delete_batch, bucket, batch), what)
    return len(keys)


def _delete_batch(bucket: str, keys: list[str]) -> None:
    response = client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True})
    if response.get("Errors"):  # per-key failures come back in a 200 answer: raise the first one
        first = response["Errors"][0]
        raise botocore.exceptions.ClientError(
            {"Error": {"Code": first.get("Code", ""), "Message": first.get("Message", "")},
             "ResponseMetadata": {"HTTPStatusCode": 500 if first.get("Code") in _RETRYABLE_CODES else 400}},
            "DeleteObjects")
