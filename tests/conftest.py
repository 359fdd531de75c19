"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 endpoint for the session: moto's server on 127.0.0.1 (a free port).

    Sets the standard AWS environment (AWS_ENDPOINT_URL and dummy credentials), so plain boto3
    clients and subprocesses started by tests talk to it. Yields the endpoint URL. Tests create
    their own buckets with unique names.
    """
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {name: os.environ.get(name) for name in [*env, "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"]}
    os.environ.update(env)
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield endpoint
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32 + 8 image procedural Dataset at 32 px, for tests that only need some valid input."""
    from gramline.data.synthetic import write_synthetic_dataset

    path = tmp_path_factory.mktemp("small") / "dataset"
    write_synthetic_dataset(path, n_train=32, n_eval=8, size=32, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_pretrain_run(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The README's main job, once per session: a procedural dataset and a default tiny pretrain
    (the real stage command). Yields (dataset dir, model dir)."""
    import subprocess
    import sys

    from gramline.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("tiny_pretrain")
    data, model = root / "data", root / "model"
    write_synthetic_dataset(data, n_train=2000, n_eval=400, size=64, seed=0)
    result = subprocess.run([sys.executable, "-m", "gramline.stages.pretrain", "--dataset", str(data),
                             "--out-model", str(model), "--preset", "tiny"], capture_output=True, text=True,
                            timeout=1800, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return data, model
