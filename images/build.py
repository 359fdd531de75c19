"""Build the gramline image with no registry reachable (CI, air-gapped hosts), or from a registry.

    python images/build.py [--variant cpu|cuda] [--tag TAG] [--online] [--force] [--cache DIR]

Offline (the default), for the CPU variant:
1. a Debian bookworm base image made locally: `debootstrap --variant=minbase` with python3 and
   python3-venv (from the configured Debian mirror), then `docker import` (cached in --cache);
2. the gramline wheel built from this checkout, and every dependency wheel gathered with the host's
   pip (`pip download`, so whatever indexes/find-links the host's pip uses) into --cache;
3. `docker build -f images/Dockerfile.cpu` with BASE_IMAGE=that base, the dependency wheels served to
   the build from 127.0.0.1 over HTTP (`--network host`), so they never enter a layer.
--online builds images/Dockerfile (or .cpu) against its default base and PyPI instead.

An existing TAG is kept when its `gramline.source` label matches this checkout's source hash
(gramline/, pyproject.toml, the Dockerfiles); otherwise, or with --force, it is rebuilt. Needs a running Docker daemon (.ci/docker.sh starts one).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.server
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE_TAG = "gramline-base:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


def log(message: str) -> None:
    print(f"[build] {message}", flush=True)


def quiet(command: list[str]) -> None:
    """Run a command; show its output only when it fails."""
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        sys.exit(f"build.py: error: {' '.join(command[:4])} ... exited with {done.returncode}")


def version() -> str:
    sys.path.insert(0, str(REPO))
    from gramline import __version__

    return __version__


def docker_client():
    import docker

    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except Exception as err:  # noqa: BLE001 - any failure means: no usable daemon
        sys.exit(f"build.py: error: no Docker daemon is reachable ({str(err).splitlines()[0]}); start one "
                 "(.ci/docker.sh does) and retry")
    return client


def image_exists(client, tag: str) -> bool:
    return image_labels(client, tag) is not None


def image_labels(client, tag: str) -> dict[str, str] | None:
    import docker

    try:
        return dict(client.images.get(tag).labels or {})
    except docker.errors.ImageNotFound:
        return None


def source_hash() -> str:
    """sha256 over what goes into the image: the package sources, pyproject.toml, the Dockerfiles."""
    digest = hashlib.sha256()
    files = sorted(p for p in (REPO / "gramline").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    files += [REPO / "pyproject.toml", REPO / "images" / "Dockerfile", REPO / "images" / "Dockerfile.cpu"]
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def base_image(client, cache: Path) -> str:
    """gramline-base:bookworm from a debootstrapped rootfs (tarball cached in `cache`)."""
    if image_exists(client, BASE_TAG):
        log(f"base image {BASE_TAG} exists")
        return BASE_TAG
    tarball = cache / "bookworm-rootfs.tar"
    if not tarball.is_file():
        if shutil.which("debootstrap") is None:
            sys.exit("build.py: error: debootstrap is not installed (apt-get install -y debootstrap)")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="gramline-rootfs-", dir=cache) as tmp:
            rootfs = Path(tmp) / "rootfs"
            log(f"debootstrap bookworm (minbase + python3, python3-venv) from {DEBIAN_MIRROR} ...")
            subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv",
                            "bookworm", str(rootfs), DEBIAN_MIRROR], check=True, stdout=subprocess.DEVNULL)
            for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for item in (rootfs / leftover).glob("*"):
                    if item.is_file():
                        item.unlink()
            partial = tarball.with_suffix(".partial")
            subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True)
            partial.rename(tarball)
        log(f"rootfs ready in {time.monotonic() - started:.0f} s ({tarball.stat().st_size >> 20} MiB)")
    log(f"docker import -> {BASE_TAG}")
    with open(tarball, "rb") as fh:
        subprocess.run(["docker", "import", "-c", "ENV LANG=C.UTF-8", "-", BASE_TAG], stdin=fh, check=True,
                       stdout=subprocess.DEVNULL)
    return BASE_TAG


def gramline_wheel(context: Path) -> Path:
    wheels = context / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    quiet([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), str(REPO)])
    found = sorted(wheels.glob(f"gramline-{version()}-*.whl"))
    if not found:
        sys.exit(f"build.py: error: no gramline wheel was built in {wheels}")
    return found[-1]


def wheelhouse(wheel: Path, cache: Path) -> Path:
    """Every dependency wheel of gramline[curate], from the host pip's own sources."""
    if sys.version_info[:2] != (3, 11):
        sys.exit("build.py: error: run with Python 3.11 (Debian bookworm's), so the wheels match the image")
    house = cache / "wheelhouse"
    house.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    quiet([sys.executable, "-m", "pip", "download", "--only-binary=:all:", "-d", str(house), f"{wheel}[curate]"])
    (house / wheel.name).unlink(missing_ok=True)  # the build takes gramline from its context
    size = sum(p.stat().st_size for p in house.glob("*.whl")) >> 20
    log(f"wheelhouse {house}: {len(list(house.glob('*.whl')))} wheels, {size} MiB ({time.monotonic() - started:.0f} s)")
    return house


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """An HTTP file server on 127.0.0.1 for the build; pip reads its listing as --find-links."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def docker_build(client, context: Path, dockerfile: Path, tag: str, buildargs: dict[str, str],
                 labels: dict[str, str]) -> None:
    shutil.copy(dockerfile, context / "Dockerfile")
    started = time.monotonic()
    log(f"docker build {dockerfile.name} -> {tag} ({', '.join(f'{k}={v}' for k, v in buildargs.items())})")
    stream = client.api.build(path=str(context), dockerfile="Dockerfile", tag=tag, buildargs=buildargs,
                              labels=labels, network_mode="host", rm=True, forcerm=True, decode=True)
    for chunk in stream:
        if "error" in chunk:
            sys.exit(f"build.py: error: docker build failed: {chunk['error'].strip()}")
        text = chunk.get("stream", "").rstrip()
        if text.startswith(("Step ", "Successfully built", "Successfully tagged")):
            log(f"{text}  [{time.monotonic() - started:.0f} s]")
    log(f"built {tag} in {time.monotonic() - started:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="images/build.py", description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tag", default=None, help="default gramline:<version> (cpu) or gramline:<version>-cuda")
    parser.add_argument("--online", action="store_true", help="use the Dockerfile's default base and PyPI")
    parser.add_argument("--force", action="store_true", help="rebuild even if the tag exists")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "gramline-image")
    args = parser.parse_args(argv)
    tag = args.tag or (f"gramline:{version()}" + ("-cuda" if args.variant == "cuda" else ""))
    if args.variant == "cuda" and not args.online:
        sys.exit("build.py: error: the CUDA variant builds on a registry base image: add --online")
    client = docker_client()
    labels = {"gramline.source": source_hash(), "gramline.variant": args.variant}
    existing = image_labels(client, tag)
    if existing is not None and not args.force:
        if existing.get("gramline.source") == labels["gramline.source"]:
            log(f"image {tag} exists and matches this checkout ({labels['gramline.source']}); nothing to do")
            return 0
        log(f"image {tag} was built from other sources ({existing.get('gramline.source')}); rebuilding")
    started = time.monotonic()
    args.cache.mkdir(parents=True, exist_ok=True)
    dockerfile = REPO / "images" / ("Dockerfile" if args.variant == "cuda" else "Dockerfile.cpu")
    with tempfile.TemporaryDirectory(prefix="gramline-context-") as tmp:
        context = Path(tmp)
        wheel = gramline_wheel(context)
        if args.online:
            docker_build(client, context, dockerfile, tag, {}, labels)
        else:
            base = base_image(client, args.cache)
            house = wheelhouse(wheel, args.cache)
            with serve(house) as url:
                docker_build(client, context, dockerfile, tag,
                             {"BASE_IMAGE": base, "PIP_INSTALL_ARGS": f"--no-index --find-links {url}"}, labels)
    log(f"done: {tag} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
