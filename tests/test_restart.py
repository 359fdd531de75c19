"""Restartable training tasks: a task killed mid-way and retried on a new pod resumes from its last
checkpoint, mirrored to a state location that outlives the pod (gramline.train.state_sync), a PVC
directory or s3:// (moto's server on 127.0.0.1); a retry after a bad input exits 2 at once; the
compiled pipeline gives each training task its per-run location and a retry window longer than its
timeout.

"A new pod" is a fresh output directory: on a cluster the output `.path` is on the pod's own disk and
the launcher uploads only after success, so a retry starts on an empty one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gramline.data import s3
from gramline.data.synthetic import write_synthetic_dataset
from gramline.errors import InputError
from gramline.train.state_sync import VERDICT, StateSync

STEPS = 6
QUICK = ["train.batch_size=8", "train.log_every=1", "heads.dino_prototypes=64", "heads.ibot_prototypes=64",
         "heads.dino_hidden=64", "heads.ibot_hidden=64", "crops.n_local=2", f"train.steps={STEPS}",
         "train.checkpoint_every=2", "train.teacher_checkpoint_every=2"]
STAGE = [sys.executable, "-m", "gramline.stages.pretrain"]
PROGRESS = re.compile(r"\[pretrain\] step: (\d+)/")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "synth"
    write_synthetic_dataset(out, n_train=96, n_eval=16, size=64, seed=3, shard_max_count=24)
    return out


def argv(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset", str(dataset), "--out-model", str(out), *(a for o in QUICK for a in ("--set", o)), *extra]


def run_stage(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*STAGE, *args], check=False, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def uninterrupted(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run without a failure (and without a state location), for comparison."""
    out = tmp_path_factory.mktemp("clean") / "model"
    result = run_stage(argv(dataset, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(params=["pvc", "s3"])
def state_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """`<root>/<run id>/pretrain` on a local "PVC" directory or in a bucket of moto's S3 server."""
    if request.param == "pvc":
        return str(tmp_path / "pvc" / "gramline-state" / "run-1" / "pretrain")
    request.getfixturevalue("s3_server")
    import boto3

    bucket = f"state-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/gramline-state/run-1/pretrain"


def kill_at_first_mirrored_checkpoint(args: list[str], uri: str, log: Path) -> int:
    """Start the stage and SIGKILL it as soon as the state location names a checkpoint; its step."""
    sync = StateSync(uri)
    with open(log, "w") as out:
        process = subprocess.Popen([*STAGE, *args], stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while process.poll() is None and time.monotonic() < deadline and sync.pointer() is None:
                time.sleep(0.05)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    pointer = sync.pointer()
    assert process.returncode == -signal.SIGKILL and pointer is not None, log.read_text()[-3000:]
    return int(pointer["step"])


def assert_same_run(a: Path, b: Path) -> None:
    for name in ("backbone.safetensors", "heads.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x), f"{name} differs from the uninterrupted run"
    def curve(path: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k in ("step", "total", "ibot", "koleo")}
                for line in (path / "metrics.jsonl").read_text().splitlines()]

    assert curve(a) == curve(b)


def test_killed_task_on_a_new_pod_resumes_from_the_state_location(dataset: Path, uninterrupted: Path,
                                                                   state_uri: str, tmp_path: Path) -> None:
    first_pod = tmp_path / "pod-1"
    step = kill_at_first_mirrored_checkpoint(argv(dataset, first_pod / "model", "--state-uri", state_uri),
                                             state_uri, tmp_path / "attempt-1.log")
    assert 0 < step < STEPS
    shutil.rmtree(first_pod)  # the pod is gone, and its disk with it

    retry = tmp_path / "pod-2" / "model"
    result = run_stage(argv(dataset, retry, "--state-uri", state_uri))
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(rf"resumed from \S+step-{step:08d} at step {step}\b", result.stdout), result.stdout
    shown = [int(s) for s in PROGRESS.findall(result.stdout)]
    assert shown and min(shown) > step and max(shown) == STEPS  # the steps before the checkpoint are not redone
    manifest = json.loads((retry / "manifest.json").read_text())
    assert manifest["resumed"] is True and manifest["step"] == STEPS
    assert_same_run(uninterrupted, retry)  # weights, and the whole logged curve (restored with the state)
    # TensorBoard's curve too: the first pod's event files are gone, the retry writes the restored steps
    events = EventAccumulator(str(retry / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = [json.loads(line) for line in (retry / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in events.Scalars("total")] == [r["step"] for r in logged] == list(range(1, STEPS + 1))
    assert [e.value for e in events.Scalars("total")] == pytest.approx([r["total"] for r in logged], rel=1e-6)
    # the teacher checkpoints the anchor stage chooses among, those from before the failure included
    teachers = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert sorted(p.name for p in (retry / "checkpoints").iterdir()) == teachers and len(teachers) == STEPS // 2
    for name in teachers:
        a, b = (load_file(str(d / "checkpoints" / name / "backbone.safetensors")) for d in (uninterrupted, retry))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert StateSync(state_uri).pointer()["step"] == STEPS


def test_retry_after_a_bad_input_exits_2_at_once(dataset: Path, tmp_path: Path) -> None:
    uri = str(tmp_path / "pvc" / "run-2" / "pretrain")
    bad = tmp_path / "dataset"
    bad.mkdir()  # no manifest.json: not a Dataset
    args = argv(bad, tmp_path / "pod-1" / "model", "--state-uri", uri)
    first = run_stage(args)
    assert first.returncode == 2 and "manifest.json" in first.stderr and "Traceback" not in first.stderr
    assert (Path(uri) / VERDICT).is_file()

    shutil.copytree(dataset, bad, dirs_exist_ok=True)  # even a now-valid input: a retry cannot change its inputs
    retry = run_stage(argv(bad, tmp_path / "pod-2" / "model", "--state-uri", uri))
    assert retry.returncode == 2, retry.stderr[-3000:]
    assert "earlier attempt" in retry.stderr and "manifest.json" in retry.stderr and "Traceback" not in retry.stderr
    assert not (tmp_path / "pod-2").exists() and StateSync(uri).pointer() is None  # no training happened


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        found += children
        frontier = children
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def test_kfp_local_retry_of_a_killed_training_task_resumes(dataset: Path, tmp_path: Path,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    """A process-mode run (kfp.local, which honours set_retry) of the real pretrain component, wired
    as the pipeline wires it (`run_id` = dsl.PIPELINE_JOB_ID_PLACEHOLDER, a PVC state root). Its
    first attempt is SIGKILLed once a checkpoint is mirrored and its output directory wiped, as a lost
    pod's would be; kfp.local's retry then resumes from the state location."""
    from kfp import dsl, local

    from gramline.kfp.components import build_components
    from gramline.kfp.local_run import host_subprocess_runner, quiet_kfp_local_warnings

    root = tmp_path / "pvc" / "gramline-state"
    pretrain = build_components(state_root=str(root))["pretrain"]

    overrides = {key: json.loads(value) for key, value in (item.split("=", 1) for item in QUICK)}

    @dsl.pipeline(name="restart")
    def restart():  # no parameters: KFP reads real annotations, and this module's are strings
        data = dsl.importer(artifact_uri=str(dataset), artifact_class=dsl.Dataset)
        task = pretrain(dataset=data.output, preset="tiny", overrides=overrides, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        task.set_retry(1, backoff_duration="3s", backoff_factor=1.0)

    killed: list[int] = []

    def kill_first_attempt() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not list(root.glob("*/pretrain/latest.json")):
            time.sleep(0.05)
        for pid in _descendants(os.getpid()):
            command = _cmdline(pid)
            if "gramline.stages.pretrain" in command:
                os.kill(pid, signal.SIGKILL)
                killed.append(int(json.loads(next(root.glob("*/pretrain/latest.json")).read_text())["step"]))
                time.sleep(0.5)  # kfp.local waits 3 s before the retry
                shutil.rmtree(command[command.index("--out-model") + 1])  # the lost pod's disk

    quiet_kfp_local_warnings()
    watcher = threading.Thread(target=kill_first_attempt, daemon=True)
    with host_subprocess_runner() as runner:
        local.init(runner=runner, pipeline_root=str(tmp_path / "runs"), raise_on_error=True)
        watcher.start()
        restart()
    watcher.join(timeout=5)
    logs = capfd.readouterr().out
    assert len(killed) == 1 and 0 < killed[0] < STEPS, logs[-3000:]

    runs = [d / "pretrain" for d in root.iterdir()]
    assert len(runs) == 1 and runs[0].parent.name.isdigit()  # kfp.local's run id: the placeholder was resolved
    assert f"at step {killed[0]}" in logs and "resumed from" in logs, logs[-3000:]
    (manifest,) = (tmp_path / "runs").glob("restart-*/pretrain/model/manifest.json")
    record = json.loads(manifest.read_text())
    assert record["resumed"] is True and record["step"] == STEPS


def _compiled(tmp_path: Path, *args: str) -> tuple[dict, dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
    try:
        from compile import main
    finally:
        sys.path.pop(0)
    out = tmp_path / "gramline.yaml"
    assert main(["--output", str(out), "--image", "gramline:test", *args]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.mark.parametrize(("flags", "root"), [(["--pvc", "claim"], "/data/gramline-state"),
                                             (["--state-root", "s3://bucket/state/"], "s3://bucket/state")])
def test_compiled_training_tasks_get_a_per_run_state_location_and_retry_past_their_timeout(
        tmp_path: Path, flags: list[str], root: str) -> None:
    from kfp import dsl

    spec, platform = _compiled(tmp_path, "--profile", "vits16", *flags)
    tasks = spec["root"]["dag"]["tasks"]
    for stage in ("pretrain", "gram", "highres", "distill", "align"):
        args = spec["deploymentSpec"]["executors"][f"exec-{stage}"]["container"]["args"]
        uri = json.loads(args[args.index("--state-uri") + 1])["Concat"]
        assert uri == [f"{root}/", "{{$.inputs.parameters['run_id']}}", f"/{stage}"]
        assert tasks[stage]["inputs"]["parameters"]["run_id"]["runtimeValue"]["constant"] == \
            dsl.PIPELINE_JOB_ID_PLACEHOLDER
    for name, task in tasks.items():
        policy = task.get("retryPolicy")
        deadline = int(platform.get(f"exec-{name}", {}).get("activeDeadlineSeconds", 0))
        if policy and deadline:  # Argo stops retrying once backoff.maxDuration has passed since the first start
            assert int(policy["backoffMaxDuration"].rstrip("s")) >= (policy["maxRetryCount"] + 1) * deadline, name
    assert "--state-uri" not in spec["deploymentSpec"]["executors"]["exec-anchor"]["container"]["args"]


def test_no_state_location_without_storage_that_outlives_a_pod(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    spec, _ = _compiled(tmp_path, "--profile", "vits16")
    assert all("--state-uri" not in e["container"]["args"] for e in spec["deploymentSpec"]["executors"].values()
               if "container" in e)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
    try:
        from compile import main
    finally:
        sys.path.pop(0)
    assert main(["--output", str(tmp_path / "x.yaml"), "--profile", "vits16", "--state-root", "/tmp/state"]) == 2
    assert "--state-root '/tmp/state'" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def _checkpoint(root: Path, step: int) -> Path:
    """A checkpoint directory as gramline.train.checkpoint lays it out (the contents are opaque here)."""
    path = root / f"step-{step:08d}"
    path.mkdir(parents=True)
    for name in ("meta.json", "model.pt", "rank-0.pt", "rank-1.pt"):
        (path / name).write_bytes(os.urandom(1000 + step) + name.encode())
    return path


def test_a_checkpoint_cut_off_mid_upload_is_never_read_back(s3_server: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Through the fault proxy of tests/s3_faults.py: an S3 outage for one file of a checkpoint
    leaves the previous one as what a retry reads; training is only warned."""
    import boto3
    from s3_faults import FaultPlan, FaultProxy

    bucket = f"state-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    for name, value in {"GRAMLINE_S3_ATTEMPTS": "3", "GRAMLINE_S3_BACKOFF_S": "0.002", "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(name, value)
    sync = StateSync(f"s3://{bucket}/gramline-state/run-3/pretrain")
    local = tmp_path / "pod-1" / "state"
    sync.push(_checkpoint(local, 2), exports=[_checkpoint(tmp_path / "pod-1" / "checkpoints", 1)])
    with FaultProxy(s3_server, FaultPlan(outage={"put": "/step-00000004/rank-0.pt"})) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        sync.push(_checkpoint(local, 4))  # meta.json and model.pt are uploaded, rank-0.pt is not
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert "checkpoint step 4 not mirrored" in capsys.readouterr().err

    retry = tmp_path / "pod-2"
    assert sync.restore(retry / "state", exports=retry / "checkpoints") == 2
    assert sorted(p.name for p in (retry / "state").iterdir()) == ["step-00000002"]
    for directory in ("state/step-00000002", "checkpoints/step-00000001"):
        for file in (tmp_path / "pod-1" / directory).iterdir():
            assert (retry / directory / file.name).read_bytes() == file.read_bytes()

    # a later checkpoint replaces both, the partial one too, and only the exports still listed stay
    sync.push(_checkpoint(local, 6), exports=[_checkpoint(tmp_path / "pod-1" / "checkpoints", 5)])
    keys = {key.split("/", 3)[3] for key, _ in s3.list_objects(sync.uri)}
    assert {key.split("/")[0] for key in keys} == {"step-00000006", "exports", "latest.json"}
    assert {key.split("/")[1] for key in keys if key.startswith("exports/")} == {"step-00000005"}


def test_a_state_location_that_is_not_storage_is_refused(tmp_path: Path) -> None:
    for uri in ("relative/dir", "gs://bucket/x", "s3://"):
        with pytest.raises(InputError, match="--state-uri"):
            StateSync(uri)
    (tmp_path / "latest.json").write_text('{"step": 2, "dir": "../../etc", "files": {}}')
    with pytest.raises(InputError, match="malformed latest.json"):
        StateSync(str(tmp_path)).restore(tmp_path / "state")


def test_a_retry_on_a_new_pod_gets_the_runs_log_files_back(tmp_path: Path) -> None:
    """The metrics log and the MLflow run id go with each checkpoint, so that a retry continues the
    same curves and the same MLflow run; a file the run does not have is not made up."""
    from gramline.train.run import run_files

    sync = StateSync(str(tmp_path / "pvc" / "run-4" / "pretrain"))
    first = tmp_path / "pod-1" / "model"
    (first / "metrics.jsonl").parent.mkdir(parents=True)
    (first / "metrics.jsonl").write_text('{"step": 1, "total": 3.5}\n{"step": 2, "total": 3.25}\n')
    (first / "mlflow_run_id").write_text("0123456789abcdef\n")
    sync.push(_checkpoint(first / "state", 2), run_files(first))
    (first / "metrics.jsonl").write_text("")  # later records without a checkpoint are not what a retry reads

    retry = tmp_path / "pod-2" / "model"
    assert sync.restore(retry / "state", run_files(retry)) == 2
    assert (retry / "metrics.jsonl").read_text() == '{"step": 1, "total": 3.5}\n{"step": 2, "total": 3.25}\n'
    assert (retry / "mlflow_run_id").read_text() == "0123456789abcdef\n"

    without_mlflow = StateSync(str(tmp_path / "pvc" / "run-5" / "pretrain"))
    (first / "mlflow_run_id").unlink()
    without_mlflow.push(_checkpoint(tmp_path / "pod-3" / "state", 2), run_files(first))
    again = tmp_path / "pod-4" / "model"
    assert without_mlflow.restore(again / "state", run_files(again)) == 2
    assert not (again / "mlflow_run_id").exists()


def test_mirroring_runs_beside_training_and_uploads_the_newest_checkpoint(tmp_path: Path) -> None:
    """While an upload is held up, `submit` returns, the checkpointer may delete what was submitted,
    and of the checkpoints submitted meanwhile only the newest goes up next."""
    from gramline.train.state_sync import BackgroundMirror

    sync = StateSync(str(tmp_path / "pvc" / "run-6" / "pretrain"))
    gate, started, uploaded = threading.Event(), threading.Event(), []
    put_dir = sync.store.put_dir

    def held_put_dir(name: str, source: Path) -> None:
        uploaded.append(name)
        started.set()
        assert gate.wait(60)
        put_dir(name, source)

    sync.store.put_dir = held_put_dir  # the real local store, held up until the test lets it go
    state, model = tmp_path / "pod-1" / "state", tmp_path / "pod-1" / "model"
    model.mkdir(parents=True)
    mirror = BackgroundMirror(sync, model / ".state-mirror")
    contents = {}
    for step in (2, 4, 6):
        checkpoint = _checkpoint(state, step)
        contents[step] = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
        (model / "metrics.jsonl").write_text(f'{{"step": {step}}}\n')
        mirror.submit(checkpoint, [model / "metrics.jsonl"])  # returns while step 2's upload is held
        shutil.rmtree(checkpoint)  # pruned by the checkpointer
        assert started.wait(60)  # step 2's upload has begun (and is held) before steps 4 and 6 come
    assert sync.pointer() is None and uploaded == ["step-00000002"]
    gate.set()
    mirror.close()
    assert uploaded == ["step-00000002", "step-00000006"]  # step 4 was overtaken while it waited
    assert not (model / ".state-mirror").exists()
    retry = tmp_path / "pod-2" / "model"
    assert sync.restore(retry / "state", [retry / "metrics.jsonl"]) == 6
    assert {p.name: p.read_bytes() for p in (retry / "state" / "step-00000006").iterdir()} == contents[6]
    assert (retry / "metrics.jsonl").read_text() == '{"step": 6}\n'


def test_a_mirror_that_cannot_write_fails_the_run_at_its_next_checkpoint(tmp_path: Path) -> None:
    from gramline.train.state_sync import BackgroundMirror

    (tmp_path / "not-a-dir").write_text("")
    mirror = BackgroundMirror(StateSync(str(tmp_path / "not-a-dir" / "pretrain")), tmp_path / "staging")
    mirror.submit(_checkpoint(tmp_path / "state", 2))
    with pytest.raises(InputError, match="--state-uri .* cannot be used"):
        mirror.close()
