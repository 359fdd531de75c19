"""Docker path, against the real daemon: the image (non-root, no entrypoint, stage command), one
stage re-run in a container on local directories (Docker SDK), the tiny DAG through kfp.local's
DockerRunner, and the one-line error for an image that is not there.

Skipped when no Docker daemon answers (.ci/docker.sh starts one and builds the image). The image is
`gramline:<version>` (or $GRAMLINE_TEST_IMAGE); a missing or stale one is built by images/build.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

docker = pytest.importorskip("docker")
pytest.importorskip("kfp")

from gramline import __version__

REPO = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("GRAMLINE_TEST_IMAGE", f"gramline:{__version__}")


def _daemon() -> object | None:
    try:
        client = docker.from_env(timeout=30)
        client.ping()
        return client
    except Exception:  # noqa: BLE001 - any failure means: no usable daemon
        return None


pytestmark = [pytest.mark.docker,
              pytest.mark.skipif(_daemon() is None, reason="no Docker daemon is reachable (start one: .ci/docker.sh)")]


@pytest.fixture(scope="module")
def client() -> object:
    return _daemon()


@pytest.fixture(scope="module")
def image(client: object) -> str:
    """The image under test, built (or refreshed when the sources changed) by images/build.py."""
    if "GRAMLINE_TEST_IMAGE" not in os.environ:
        done = subprocess.run([sys.executable, str(REPO / "images" / "build.py"), "--tag", IMAGE], check=False,
                              timeout=1500)
        assert done.returncode == 0, "images/build.py failed"
    return IMAGE


def gramline(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from gramline.cli import main; main()", *args],
                          check=False, capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_image_runs_stages_as_a_non_root_user_without_an_entrypoint(client: object, image: str) -> None:
    attrs = client.images.get(image).attrs["Config"]
    assert not attrs.get("Entrypoint")
    assert attrs["User"] not in ("", "0", "root", "0:0")
    script = "id -u; python -m gramline.stages.pretrain --help | head -1; touch /s3/x /minio/x && echo writable"
    out = client.containers.run(image, ["sh", "-c", script],
                                network_mode="host", remove=True).decode()
    uid, usage, writable = out.strip().splitlines()[:3]
    assert uid != "0" and usage.startswith("usage: python -m gramline.stages.pretrain") and writable == "writable"


@pytest.mark.slow
def test_rerun_one_stage_in_a_container_on_local_directories(image: str, small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "outputs" / "model"
    done = gramline("rerun", "pretrain", "--runner", "docker", "--image", image, "--input", f"dataset={small_dataset}",
                    "--output", f"model={out}", "--set", "train.steps=2", "--set", "train.checkpoint_every=1",
                    "--gpus", "none", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert f"model: {out}" in done.stdout and f"image {image}" in done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "Model" and manifest["step"] == 2
    assert (out / "backbone.safetensors").stat().st_uid == os.getuid()  # written as the host user


@pytest.mark.slow
def test_tiny_dag_through_the_docker_runner(image: str, tmp_path: Path) -> None:
    from test_local_run_dag import check_dag_outputs, run_dag

    compiled = subprocess.run([sys.executable, str(REPO / "pipeline" / "compile.py"), "--preset", "tiny", "--image",
                               image, "--output", str(tmp_path / "gramline.yaml")], check=False, capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stderr
    run_dir = run_dag(tmp_path / "gramline.yaml", tmp_path / "root", "docker", "--gpus", "none")
    check_dag_outputs(run_dir)


def test_an_image_that_is_not_there_is_one_line(small_dataset: Path, tmp_path: Path) -> None:
    done = gramline("rerun", "pretrain", "--runner", "docker", "--image", "gramline-missing:0.0.0",
                    "--input", f"dataset={small_dataset}", cwd=tmp_path, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "--image 'gramline-missing:0.0.0': is not a local image and could not be pulled" in lines[0]
