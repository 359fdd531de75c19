"""The local Docker daemon for `gramline run/rerun --runner docker`: checks with one-line errors,
and the `containers.run` settings both commands share (user, shared memory, network, GPUs, env).

Containers never run as root unless asked (`--as-root`): as a normal user they run as that user, so
outputs stay theirs; invoked as root (or through sudo) they run as the sudo caller, else as nobody.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
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
                         "an image built by images/build.py (docker images lists it) or one a registry serves") from None


NOBODY = (65534, 65534)


def container_user(as_root: bool = False) -> tuple[int, int]:
    """(uid, gid) the containers run as: the caller's; for root, the sudo caller's or nobody's."""
    if as_root:
        return 0, 0
    if os.getuid() != 0:
        return os.getuid(), os.getgid()
    sudo_uid, sudo_gid = os.environ.get("SUDO_UID", ""), os.environ.get("SUDO_GID", "")
    if sudo_uid.isdigit() and int(sudo_uid) != 0:
        return int(sudo_uid), int(sudo_gid) if sudo_gid.isdigit() else int(sudo_uid)
    return NOBODY


def writable_dir(path: Path, user: tuple[int, int]) -> Path:
    """Create `path` (and its missing parents) for a container running as `user` to write into.

    Only when we are root and the container is not does an ownership change: a root-owned directory
    itself goes to the container's user (not its contents, never its parents).
    """
    path.mkdir(parents=True, exist_ok=True)
    if os.getuid() == 0 and user[0] != 0 and path.stat().st_uid == 0:
        os.chown(path, *user)
    return path


@dataclass(frozen=True)
class ContainerSettings:
    user: tuple[int, int] = field(default_factory=container_user)
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
        """`containers.run` keyword arguments: the user (`container_user`), /dev/shm size, network,
        GPUs and the pass-through environment."""
        args: dict[str, Any] = {
            "user": f"{self.user[0]}:{self.user[1]}",
            "shm_size": self.shm_size,
            "network_mode": self.network,
            "environment": {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ},
        }
        requests = self.gpu_requests(docker_client)
        if requests:
            args["device_requests"] = requests
        return args
