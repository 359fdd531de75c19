"""The local Docker daemon for `gramline run/rerun --runner docker`: checks with one-line errors,
and the `containers.run` settings both commands share (user, shared memory, network, GPUs, env).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

from gramline.errors import InputError
from gramline.kfp.components import check_image

# Host variables passed into containers (S3 sources and credentials, thread counts).
PASSTHROUGH_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                   "AWS_DEFAULT_REGION", "AWS_REGION", "OMP_NUM_THREADS")


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def client() -> Any:
    """A client for a daemon that answers, or an InputError saying there is none."""
    try:
        import docker
    except ImportError:
        raise InputError("--runner docker", "the docker Python package is not installed",
                         "pip install 'gramline[pipeline]'") from None
    try:
        docker_client = docker.from_env(timeout=30)
        docker_client.ping()
    except Exception as err:  # noqa: BLE001 - docker raises DockerException, requests errors, OSError...
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise InputError("--runner docker", f"no Docker daemon is reachable at {where} ({_reason(err)})",
                         "a running Docker daemon (start dockerd), or --runner process") from None
    return docker_client


def ensure_image(docker_client: Any, image: str, flag: str = "--image") -> None:
    """The image is present locally, or pulled now; otherwise a one-line InputError."""
    import docker

    check_image(image, flag)
    try:
        docker_client.images.get(image)
        return
    except docker.errors.ImageNotFound:
        pass
    except docker.errors.APIError as err:
        raise InputError(f"{flag} {image!r}", f"cannot be inspected ({_reason(err)})", "a local image") from None
    try:
        docker_client.images.pull(image)
    except Exception as err:  # noqa: BLE001 - any pull failure is reported the same way
        raise InputError(f"{flag} {image!r}", f"is not a local image and could not be pulled ({_reason(err)})",
                         "an image built by images/build.sh (docker images lists it) or one a registry serves") from None


@dataclass(frozen=True)
class ContainerSettings:
    shm_size: str = "2g"
    network: str = "host"  # stages need no network except S3; host works with dockerd --bridge=none
    gpus: str = "auto"  # auto | all | none | <count>

    def gpu_requests(self, docker_client: Any) -> list[Any]:
        import docker

        gpus = self.gpus.strip().lower()
        if gpus == "auto":
            runtimes = docker_client.info().get("Runtimes", {}) or {}
            gpus = "all" if ("nvidia" in runtimes or shutil.which("nvidia-smi")) else "none"
        if gpus == "none":
            return []
        if gpus == "all":
            return [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
        if not gpus.isdigit() or int(gpus) < 1:
            raise InputError(f"--gpus {self.gpus!r}", "is not understood", "auto, all, none or a GPU count")
        return [docker.types.DeviceRequest(count=int(gpus), capabilities=[["gpu"]])]

    def run_args(self, docker_client: Any) -> dict[str, Any]:
        """`containers.run` keyword arguments: the host user (so bind-mounted outputs stay the user's),
        /dev/shm size, network, GPUs and the pass-through environment."""
        args: dict[str, Any] = {
            "user": f"{os.getuid()}:{os.getgid()}",
            "shm_size": self.shm_size,
            "network_mode": self.network,
            "environment": {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ},
        }
        requests = self.gpu_requests(docker_client)
        if requests:
            args["device_requests"] = requests
        return args
