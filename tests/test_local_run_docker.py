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


def output_of(client: object, image: str, command: list[str], **kwargs: object) -> str:
    """A container's stdout, read once it has exited successfully (a log stream attached at its start,
    as `containers.run` without detach does, can miss a short container's output on a loaded host)."""
    container = client.containers.run(image, command, network_mode="host", detach=True, **kwargs)
    try:
        assert container.wait(timeout=300)["StatusCode"] == 0, container.logs().decode()
        return container.logs(stdout=True, stderr=False).decode()
    finally:
        container.remove(force=True)


def gramline(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from gramline.cli import main; main()", *args],
                          check=False, capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_image_runs_stages_as_a_non_root_user_without_an_entrypoint(client: object, image: str) -> None:
    attrs = client.images.get(image).attrs["Config"]
    assert not attrs.get("Entrypoint")
    assert attrs["User"] not in ("", "0", "root", "0:0")
    script = "id -u; python -m gramline.stages.pretrain --help | head -1; touch /s3/x /minio/x && echo writable"
    out = output_of(client, image, ["sh", "-c", script])
    uid, usage, writable = out.strip().splitlines()[:3]
    assert uid != "0" and usage.startswith("usage: python -m gramline.stages.pretrain") and writable == "writable"



def test_the_image_installs_the_versions_ci_tests(client: object, image: str) -> None:
    """Every package of the image that constraints.txt pins (the lock file .ci/run installs the test
    environment with) has the pinned version; the launcher's kubernetes client is among them."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    listed = output_of(client, image, ["python", "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"])
    installed = {}
    for line in listed.splitlines():
        name, sep, version = line.partition("==")
        if sep:
            installed[name.lower().replace("_", "-")] = version.split("+")[0]  # torch's +cpu/+cuXYZ build tag
    assert "kubernetes" in installed and "torch" in installed
    wrong = {name: (installed[name], pins[name]) for name in installed.keys() & pins.keys()
             if installed[name] != pins[name]}
    assert not wrong, f"image vs constraints.txt: {wrong}"


def test_a_directory_under_the_hosts_root_home_is_reachable_by_a_non_root_container(client: object, image: str,
                                                                                     tmp_path: Path) -> None:
    """Directories are mounted at their own paths: one under /root (root's own runs) lands below the
    image's /root, which the container's non-root user must be able to pass through."""
    (tmp_path / "data.txt").write_text("seen")
    tmp_path.chmod(0o755)
    mount = docker.types.Mount("/root/gramline-test/data", str(tmp_path), type="bind", read_only=True)
    out = output_of(client, image, ["cat", "/root/gramline-test/data/data.txt"], mounts=[mount], user="65534:65534")
    assert out == "seen"


@pytest.fixture
def container_mounts(monkeypatch: pytest.MonkeyPatch) -> list[list[dict]]:
    """The mounts of every container started in this process, as the daemon reports them."""
    from docker.models.containers import ContainerCollection

    seen: list[list[dict]] = []
    start = ContainerCollection.run

    def run(self: object, *args: object, **kwargs: object) -> object:
        container = start(self, *args, **kwargs)
        container.reload()
        seen.append(container.attrs["Mounts"])
        return container

    monkeypatch.setattr(ContainerCollection, "run", run)
    return seen


def rerun(*args: str) -> int:
    from gramline.kfp import local_run

    return local_run.main("rerun", [*args, "--runner", "docker", "--gpus", "none"])


@pytest.mark.slow
def test_rerun_mounts_only_its_inputs_and_outputs(image: str, small_dataset: Path, tmp_path: Path,
                                                  container_mounts: list[list[dict]]) -> None:
    """A pretrain, then a benchmark of its model, each re-run in a container: the daemon shows the
    inputs read-only and the output directories read-write, never a parent (the home directory the
    outputs live in stays unseen); file outputs (metrics, HTML, Markdown) arrive where asked."""
    home = tmp_path / "home"
    (home / "private").mkdir(parents=True)
    model = home / "model"
    assert rerun("pretrain", "--image", image, "--input", f"dataset={small_dataset}", "--output", f"model={model}",
                 "--set", "train.steps=2", "--set", "train.checkpoint_every=1", "--out-dir", str(home)) == 0
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["kind"] == "Model" and manifest["step"] == 2
    (mounts,) = container_mounts
    work = [m["Source"] for m in mounts if Path(m["Source"]).name.startswith("gramline-rerun-pretrain-")]
    assert {(m["Source"], m["RW"]) for m in mounts} == {(str(small_dataset), False), (str(model), True),
                                                         (work[0], True)}
    assert len(work) == 1 and not work[0].startswith(str(home))  # the private executor-output directory

    from gramline.kfp.dockerhost import container_user

    assert (model / "backbone.safetensors").stat().st_uid == container_user()[0]  # written as that user, not root

    models = {name: model for name in ("pretrain", "anchor", "gram", "highres", "distill", "align")}
    staged = {"metrics": home / "metrics", "report": home / "report.html", "report_md": home / "report.md"}
    assert rerun("benchmark", "--image", image, "--input", f"eval_dataset={small_dataset}",
                 *[f"--input={name}={path}" for name, path in models.items()],
                 *[f"--output={name}={path}" for name, path in staged.items()],
                 "--output", f"report_dir={home / 'report'}", "--out-dir", str(home)) == 0
    sources = {m["Source"]: m["RW"] for m in container_mounts[1]}
    assert sources[str(home / "report")] is True and sources[str(model)] is False
    assert not any(source in (str(home), str(tmp_path)) or source in map(str, staged.values()) for source in sources)
    assert json.loads((staged["metrics"] / "metrics.json").read_text())["models"]
    assert "<html" in staged["report"].read_text().lower() and staged["report_md"].read_text().startswith("#")
    assert (home / "report" / "manifest.json").is_file()


def test_rerun_of_curation_in_a_container_reads_a_local_source(image: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 container_mounts: list[list[dict]],
                                                                 capfd: pytest.CaptureFixture[str]) -> None:
    """A folder given by a relative path, and a brace pattern of tar shards: each is made absolute
    and mounted read-only (the pattern by its folder), so the plan in the container finds it."""
    import io
    import tarfile

    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(4):
        buf = io.BytesIO()
        Image.new("RGB", (40, 40), (60 * i, 20, 200)).save(buf, "PNG")
        (tmp_path / "images" / f"{i}.png").write_bytes(buf.getvalue())
        with tarfile.open(shards / f"train-{i:03d}.tar", "w") as tar:
            info = tarfile.TarInfo(f"{i}.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    for source, mounted, planned in (("images", tmp_path / "images", "4 items"),
                                     ("shards/train-{000..003}.tar", shards, "4 tar shards")):
        assert rerun("curate-plan", "--image", image, "--param", f"source={source}", "--out-dir", "out") == 0
        assert (str(mounted), False) in {(m["Source"], m["RW"]) for m in container_mounts[-1]}
        assert planned in capfd.readouterr().out  # the container's log


def test_a_dag_run_in_containers_reads_a_local_source(image: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`gramline run --runner docker` with a local folder as `source`: kfp.local's containers get it
    mounted read-only beside the pipeline root, and the curation DAG (plan, partitions, reduce) runs."""
    from PIL import Image
    from test_curate_partitions import compile_curate_only

    from gramline.kfp import local_run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    for i in range(6):
        Image.new("RGB", (40 + i, 40), (40 * i, 90, 200 - 30 * i)).save(tmp_path / "images" / f"{i}.png")
    yaml_path = compile_curate_only(tmp_path / "curate.yaml")
    assert local_run.main("run", ["--pipeline", str(yaml_path), "--runner", "docker", "--gpus", "none",
                                  "--root", "runs", "--param", "source=images",
                                  "--param", 'overrides={"partition.count": 2, "split.eval_fraction": 0.3}']) == 0
    (dataset,) = (tmp_path / "runs").glob("*/curate/dataset")
    assert json.loads((dataset / "stats.json").read_text())["funnel"]["decoded"] == 6


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


def test_a_build_removes_the_images_earlier_builds_made_from_other_sources(client: object, tmp_path: Path) -> None:
    """Every source change makes a new ~7 GB image: images/build.py removes the superseded ones of its
    variant (tagged or dangling) and keeps this content's, other variants' and one a container uses."""
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location("image_build", REPO / "images" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)

    def labelled(tag: str | None, variant: str, source: str) -> str:
        image, _ = client.images.build(fileobj=io.BytesIO(f"FROM scratch\nLABEL probe={tag}\n".encode()),
                                       labels={"gramline.variant": variant, "gramline.source": source}, rm=True)
        if tag:
            image.tag("gramline-prune-test", tag)
        return image.id

    old = labelled("old", "prune-test", "a")
    dangling = labelled(None, "prune-test", "b")
    current = labelled("current", "prune-test", "c")
    other_variant = labelled("other", "prune-test-other", "a")
    in_use = labelled("in-use", "prune-test", "d")
    container = client.containers.create(in_use, command=["none"])
    try:
        build.remove_superseded(client, "prune-test", "c")
        left = {image.id for image in client.images.list(filters={"label": "gramline.variant"})}
        assert current in left and other_variant in left and in_use in left
        assert old not in left and dangling not in left
    finally:
        container.remove(force=True)
        for image in (current, other_variant, in_use):
            client.images.remove(image, force=True)
