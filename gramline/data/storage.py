"""Open shard URLs for reading: local paths (and `file://`) here, `s3://` through `open_s3`.

Every reader of shards goes through `open_url`, so adding a storage backend means adding one
branch here and nothing else.
"""

from __future__ import annotations

from typing import BinaryIO

from gramline.errors import InputError


def open_url(url: str) -> BinaryIO:
    """A readable binary file object for `url` (the caller closes it).

    Local files come back seekable, which lets tar readers skip members by seeking.
    """
    if url.startswith("s3://"):
        return open_s3(url)
    path = url.removeprefix("file://")
    if "://" in path:
        raise InputError(f"shard URL {url}", "has an unsupported scheme", "a local path, file:// or s3:// URL")
    try:
        return open(path, "rb")
    except FileNotFoundError as err:
        raise InputError(f"shard {path}", "does not exist", "an existing shard file") from err
    except IsADirectoryError as err:
        raise InputError(f"shard {path}", "is a directory", "a tar shard file") from err


def open_s3(url: str) -> BinaryIO:
    """Stream an `s3://bucket/key` object through boto3 (endpoint from `AWS_ENDPOINT_URL`).

    Forward-only and buffered. Transient failures are retried and a read that breaks mid-object
    resumes with a byte range (`gramline.data.s3`); a missing bucket or key is an InputError, S3
    still failing after the retries a TransientError.
    """
    from gramline.data.s3 import open_object

    return open_object(url, "shard")
