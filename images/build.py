"""Build the gramline image, with or without a registry (CI, air-gapped hosts).

    python images/build.py [--variant cpu|cuda] [--tag TAG | --image-registry REG] [--base auto|registry|debootstrap]
                           [--online] [--force] [--keep-old] [--cache DIR] [--print-tag]
    python images/build.py --write-constraints      # constraints.txt from this Python environment

The default tag is `[REG/]gramline:<version>-<content hash>` (cpu) or `[REG/]gramline-cuda:...`
(cuda): the hash covers what goes into the image (gramline/, pyproject.toml, constraints.txt, the
Dockerfiles; gramline.kfp.profiles.image_reference), so changed content gets a new tag, and
`pipeline/compile.py` names the same tag by default. `--print-tag` prints it and exits. Every
dependency is installed with `pip install -c constraints.txt`, as .ci/run installs the test
environment, so the image runs the versions the tests ran (torch included).

Any host Python >= 3.10 and a Docker daemon you may use (root or the docker group). For the CPU
variant, by default:
1. a Debian bookworm base image with Python 3.11: `python:3.11-slim-bookworm` pulled from the
   registry when one answers; otherwise (`--base debootstrap`, or auto with no registry) one made
   locally with `debootstrap --variant=minbase` (needs root, once: the image is kept) and imported;
2. the gramline wheel built from this checkout, and every dependency wheel for the image's Python
   3.11 gathered with the host's pip (`pip download`, so whatever indexes/find-links it uses) into
   --cache. PyTorch's CPU wheels are taken when the host's pip sources or PyTorch's CPU index have
   them for the host's torch version; otherwise the build says so and uses the CUDA build, which
   runs on CPUs too but weighs ~3 GB more;
3. `docker build -f images/Dockerfile.cpu` with BASE_IMAGE=that base, the dependency wheels served to
   the build from 127.0.0.1 over HTTP (`--network host`), so they never enter a layer.
--online builds images/Dockerfile (or .cpu) against its default base and PyPI instead.

An existing TAG is kept when its `gramline.source` label matches this checkout's content hash;
otherwise, or with --force, it is rebuilt. Each build is ~7 GB and every source change makes a new
one, so once this checkout's image is in place the local images of the same variant built from other
sources are removed (--keep-old keeps them; an image a container still uses is kept). Needs a
running Docker daemon (.ci/docker.sh starts one).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import http.server
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE_TAG = "gramline-base:bookworm"
REGISTRY_BASE = "python:3.11-slim-bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
IMAGE_PYTHON = ("3.11", "cp311")  # Debian bookworm's Python, the image's


def log(message: str) -> None:
    print(f"[build] {message}", flush=True)


def quiet(command: list[str]) -> None:
    """Run a command; show its output only when it fails."""
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        sys.exit(f"build.py: error: {' '.join(command[:4])} ... exited with {done.returncode}")


sys.path.insert(0, str(REPO))  # gramline from this checkout, whatever the host Python has installed
from gramline import __version__
from gramline.kfp.profiles import content_hash, image_reference  # one tag for build and compile

CONSTRAINTS = REPO / "constraints.txt"
IMAGE_EXTRAS = "curate,cluster"  # what the image installs: the Dockerfiles' GRAMLINE_EXTRAS default, passed as a build arg
CONSTRAINED_EXTRAS = ("test",)  # constraints.txt covers gramline's dependencies and these extras'


def version() -> str:
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


def installed_requirements(extras: tuple[str, ...] = CONSTRAINED_EXTRAS) -> dict[str, str]:
    """Every distribution gramline[extras] needs, transitively, with its version in this environment
    (environment markers evaluated here), by canonical name; gramline itself excluded."""
    import tomllib  # Python >= 3.11
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]  # this checkout's, not the installed
    optional = project["optional-dependencies"]
    pinned: dict[str, str] = {}
    todo: list[tuple[str, set[str]]] = [("gramline", set(extras))]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, wanted = todo.pop()
        if (name, frozenset(wanted)) in seen:
            continue
        seen.add((name, frozenset(wanted)))
        if name == "gramline":
            requires = [*project["dependencies"], *(r for e in sorted(wanted) for r in optional[e])]
        else:
            dist = metadata.distribution(name)
            pinned[name] = dist.version
            requires = dist.requires or []
        for text in requires:
            req = Requirement(text)
            if canonicalize_name(req.name) == "gramline":
                todo.append(("gramline", set(req.extras)))
                continue
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ({""} | wanted)):
                todo.append((canonicalize_name(req.name), set(req.extras)))
    return dict(sorted(pinned.items()))


def write_constraints(path: Path = CONSTRAINTS) -> None:
    lines = [f"{name}=={ver.split('+')[0]}" for name, ver in installed_requirements().items()]
    header = ("# Generated by `python images/build.py --write-constraints` from the test environment: every\n"
              "# dependency of gramline[test] (all its extras but mlflow), pinned. images/build.py and .ci/run\n"
              "# install with `pip install -c constraints.txt`, so the image runs what the tests ran.\n")
    path.write_text(header + "".join(f"{line}\n" for line in lines))
    log(f"{path}: {len(lines)} pins")


def pinned_version(package: str) -> str | None:
    """`package`'s version in constraints.txt."""
    for line in CONSTRAINTS.read_text().splitlines():
        name, sep, ver = line.partition("==")
        if sep and name.strip().lower() == package:
            return ver.strip()
    return None


def base_image(client, cache: Path, how: str) -> str:
    """A bookworm base with Python 3.11: a local gramline-base, else the registry's python image, else
    one debootstrapped here (the rootfs tarball cached in `cache`)."""
    import docker

    if how != "registry" and image_exists(client, BASE_TAG):
        log(f"base image {BASE_TAG} exists")
        return BASE_TAG
    if how != "debootstrap":
        if image_exists(client, REGISTRY_BASE):
            log(f"base image {REGISTRY_BASE} exists")
            return REGISTRY_BASE
        try:
            log(f"docker pull {REGISTRY_BASE} ...")
            client.images.pull(REGISTRY_BASE)
            return REGISTRY_BASE
        except docker.errors.APIError as err:
            if how == "registry":
                sys.exit(f"build.py: error: cannot pull {REGISTRY_BASE} ({str(err).splitlines()[0]})")
            log(f"no registry answered ({str(err).splitlines()[0][:120]}); making the base with debootstrap")
    return debootstrap_base(cache)


def debootstrap_base(cache: Path) -> str:
    tarball = cache / "bookworm-rootfs.tar"
    if not tarball.is_file():
        if shutil.which("debootstrap") is None:
            sys.exit("build.py: error: no registry is reachable and debootstrap is not installed "
                     "(apt-get install -y debootstrap)")
        if os.geteuid() != 0:
            sys.exit(f"build.py: error: no registry is reachable for {REGISTRY_BASE}, and making the base image "
                     "with debootstrap needs root: run `sudo python3 images/build.py` once (the base image "
                     f"{BASE_TAG} is kept for later builds as any docker user), or `docker load` a "
                     f"{REGISTRY_BASE} image saved elsewhere")
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


def image_platform_args() -> list[str]:
    """`pip download` flags for wheels that install in the image (CPython 3.11, glibc 2.36 Linux on
    this machine's architecture), whatever the host's Python is."""
    arch = {"arm64": "aarch64", "amd64": "x86_64"}.get(platform.machine().lower(), platform.machine().lower())
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(36, 4, -1)]
    tags += [f"manylinux{legacy}_{arch}" for legacy in ("2014", "2010", "1")]
    version, abi = IMAGE_PYTHON
    return ["--only-binary=:all:", "--python-version", version, "--implementation", "cp", "--abi", abi,
            *(arg for tag in tags for arg in ("--platform", tag))]


def cpu_torch(house: Path) -> list[str]:
    """CPU builds of constraints.txt's torch and torchvision into `house`, from the host's pip sources
    or PyTorch's CPU index; the pins that select them, or [] when neither has them."""
    versions = {name: pinned_version(name) for name in ("torch", "torchvision")}
    if not all(versions.values()):
        sys.exit(f"build.py: error: {CONSTRAINTS} pins no torch/torchvision (python images/build.py --write-constraints)")
    pins = [f"{name}=={version}+cpu" for name, version in versions.items()]
    for where, extra in (("the host's pip sources", []), (CPU_INDEX, ["--index-url", CPU_INDEX])):
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(house), "--timeout",
                               "15", "--retries", "0", *image_platform_args(), *extra, *pins],
                              check=False, capture_output=True, text=True)
        if done.returncode == 0:
            log(f"CPU builds {', '.join(pins)} from {where}")
            return pins
    return []


def wheelhouse(wheel: Path, cache: Path, variant: str) -> Path:
    """Every dependency wheel of gramline[IMAGE_EXTRAS] for the image, from the host pip's own sources."""
    started = time.monotonic()
    house = cache / f"wheelhouse-{variant}"
    house.mkdir(parents=True, exist_ok=True)
    constraints = cache / f"constraints-{variant}.txt"
    pins = cpu_torch(house) if variant == "cpu" else []
    constraints.write_text("".join(f"{pin}\n" for pin in pins))
    if variant == "cpu" and not pins:
        log(f"WARNING: no CPU build of torch {pinned_version('torch')} is reachable (neither the host's pip sources "
            f"nor {CPU_INDEX}): this CPU image carries the CUDA build and its NVIDIA libraries (~3 GB more); "
            "it runs on CPUs all the same")
    quiet([sys.executable, "-m", "pip", "download", *image_platform_args(), "-d", str(house), "--find-links",
           str(house), "-c", str(constraints), "-c", str(CONSTRAINTS), f"{wheel}[{IMAGE_EXTRAS}]"])
    (house / wheel.name).unlink(missing_ok=True)  # the build takes gramline from its context
    wheels = sorted(house.glob("*.whl"))
    nvidia = sum(p.stat().st_size for p in wheels if p.name.startswith(("nvidia_", "cuda_", "triton-"))) >> 20
    log(f"wheelhouse {house}: {len(wheels)} wheels, {sum(p.stat().st_size for p in wheels) >> 20} MiB, of which "
        f"{nvidia} MiB CUDA libraries ({time.monotonic() - started:.0f} s)")
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


def remove_superseded(client, variant: str, source: str) -> None:
    """Remove the local images of `variant` that earlier builds made from other sources."""
    import docker

    for image in client.images.list(filters={"label": f"gramline.variant={variant}"}):
        if (image.labels or {}).get("gramline.source") == source:
            continue
        name = ", ".join(image.tags) or image.short_id
        try:
            for ref in image.tags or [image.id]:
                client.images.remove(ref, noprune=False)
            log(f"removed {name}: built from other sources ({(image.labels or {}).get('gramline.source')})")
        except docker.errors.APIError as err:  # in use by a container, say: keep it
            log(f"kept {name}: {err.explanation or err}")


def docker_build(client, context: Path, dockerfile: Path, tag: str, buildargs: dict[str, str],
                 labels: dict[str, str]) -> None:
    shutil.copy(dockerfile, context / "Dockerfile")
    started = time.monotonic()
    log(f"docker build {dockerfile.name} -> {tag} ({', '.join(f'{k}={v}' for k, v in buildargs.items())})")
    stream = client.api.build(path=str(context), dockerfile="Dockerfile", tag=tag, buildargs=buildargs,
                              labels=labels, network_mode="host", rm=True, forcerm=True, decode=True)
    recent: collections.deque[str] = collections.deque(maxlen=40)  # the failing step's last output lines
    for chunk in stream:
        if "error" in chunk:
            sys.exit("\n".join([*recent, f"build.py: error: docker build failed: {chunk['error'].strip()}"]))
        text = chunk.get("stream", "").rstrip()
        recent.extend(text.splitlines())
        if text.startswith(("Step ", "Successfully built", "Successfully tagged")):
            log(f"{text}  [{time.monotonic() - started:.0f} s]")
    size = client.images.get(tag).attrs.get("Size", 0)
    log(f"built {tag} in {time.monotonic() - started:.0f} s: {size / 1e9:.2f} GB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="images/build.py", description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("cpu", "cuda"), default="cpu")
    tags = parser.add_mutually_exclusive_group()
    tags.add_argument("--tag", default=None,
                      help="default [REG/]gramline:<version>-<content hash> (cpu) or [REG/]gramline-cuda:... (cuda)")
    tags.add_argument("--image-registry", default=None, metavar="REG", help="registry (and path) of the default tag")
    parser.add_argument("--print-tag", action="store_true", help="print the tag this build would make, and exit")
    parser.add_argument("--write-constraints", action="store_true",
                        help=f"write {CONSTRAINTS.name} from this Python environment's versions, and exit")
    parser.add_argument("--base", choices=("auto", "registry", "debootstrap"), default="auto",
                        help=f"base image: {REGISTRY_BASE} from a registry, or debootstrapped here (root); auto: "
                             "an existing one, else the registry, else debootstrap")
    parser.add_argument("--online", action="store_true", help="use the Dockerfile's default base and PyPI")
    parser.add_argument("--force", action="store_true", help="rebuild even if the tag exists")
    parser.add_argument("--keep-old", action="store_true",
                        help="keep the local images this variant's earlier builds made from other sources")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "gramline-image")
    args = parser.parse_args(argv)
    if args.write_constraints:
        write_constraints()
        return 0
    tag = args.tag or image_reference(args.variant, args.image_registry)
    if args.print_tag:
        print(tag)
        return 0
    if args.variant == "cuda" and not args.online:
        sys.exit("build.py: error: the CUDA variant builds on a registry base image: add --online")
    client = docker_client()
    labels = {"gramline.source": content_hash(), "gramline.variant": args.variant}
    existing = image_labels(client, tag)
    if existing is not None and not args.force:
        if existing.get("gramline.source") == labels["gramline.source"]:
            log(f"image {tag} exists and matches this checkout ({labels['gramline.source']}); nothing to do")
            return finish(client, args, labels)
        log(f"image {tag} was built from other sources ({existing.get('gramline.source')}); rebuilding")
    same = client.images.list(filters={"label": [f"{key}={value}" for key, value in labels.items()]})
    if same and not args.force:  # this content, built under another tag (e.g. the default one): tag it too
        from docker.utils import parse_repository_tag

        same[0].tag(*parse_repository_tag(tag))
        log(f"image {same[0].tags[0] if same[0].tags else same[0].short_id} has this content; tagged {tag}")
        return finish(client, args, labels)
    started = time.monotonic()
    args.cache.mkdir(parents=True, exist_ok=True)
    dockerfile = REPO / "images" / ("Dockerfile" if args.variant == "cuda" else "Dockerfile.cpu")
    with tempfile.TemporaryDirectory(prefix="gramline-context-") as tmp:
        context = Path(tmp)
        wheel = gramline_wheel(context)
        shutil.copy(CONSTRAINTS, context / "constraints.txt")
        if args.online:
            docker_build(client, context, dockerfile, tag, {"GRAMLINE_EXTRAS": IMAGE_EXTRAS}, labels)
        else:
            base = base_image(client, args.cache, args.base)
            house = wheelhouse(wheel, args.cache, args.variant)
            with serve(house) as url:
                docker_build(client, context, dockerfile, tag,
                             {"BASE_IMAGE": base, "PIP_INSTALL_ARGS": f"--no-index --find-links {url}",
                              "GRAMLINE_EXTRAS": IMAGE_EXTRAS}, labels)
    log(f"done: {tag} in {time.monotonic() - started:.0f} s")
    return finish(client, args, labels)


def finish(client, args: argparse.Namespace, labels: dict[str, str]) -> int:
    if not args.keep_old:
        remove_superseded(client, args.variant, labels["gramline.source"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
