"""Multi-node training as a Kubeflow Trainer TrainJob: the object against the vendored CRD schema, the
launcher against a Kubernetes API stand-in, the KFP component against the single-node one.

The stand-in (no cluster runs here) serves the endpoints the kubernetes client calls: TrainJob
create (validated against the CRD schema like the API server: 422 if invalid, 409 if it exists),
get and delete, the pod list and the pod log. Like the Trainer's torch plugin and JobSet, it starts
each of the TrainJob's `numNodes` nodes as a process running the TrainJob's own command and args
with torchrun's PET_* variables, and reports Complete when all exit 0, Failed when one does not.
"""

# no `from __future__ import annotations`: KFP reads the pipeline's real annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kfp import compiler, dsl, local

from gramline.errors import InputError
from gramline.kfp import local_run, trainjob
from gramline.kfp.components import build_components
from gramline.kfp.multinode import multinode_component
from gramline.kfp.trainjob import TRAINING_STAGES, trainjob_manifest, trainjob_name

CRD = Path(__file__).parent / "data" / "trainer-trainjob-crd.yaml"
IMAGE = "ghcr.io/example/gramline:0.1.0"
REPO = Path(__file__).resolve().parents[1]
QUICK = {"train.steps": 2, "train.checkpoint_every": 1, "train.batch_size": 4, "crops.n_local": 2,
         "heads.dino_prototypes": 32, "heads.ibot_prototypes": 32, "heads.dino_hidden": 32, "heads.ibot_hidden": 32}
JOBSET_FAILED = "jobset failed due to one or more job failures"


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused (what `kubectl apply --validate=strict` does): every
    object with declared properties gets additionalProperties: false."""
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


SCHEMA = strict(yaml.safe_load(CRD.read_text()))


def crd_errors(obj: dict) -> list[str]:
    """Schema errors plus the CRD's two CEL rules on metadata.name (jsonschema cannot run CEL)."""
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(SCHEMA).iter_errors(obj)]
    name = obj["metadata"]["name"]
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        errors.append(f"metadata.name {name!r} is not an RFC 1035 label of at most 63 characters")
    return errors


# --------------------------------------------------------------------------- the TrainJob object


def test_trainjob_manifest_validates_against_the_crd_schema() -> None:
    gpu = trainjob_manifest(name=trainjob_name("pretrain", "5f0c6d6e-8a1b-4c8e-9e3a-2b7d1c0e9f11"), stage="pretrain",
                            image=IMAGE, stage_args=["--dataset", "/data/x/inputs/dataset", "--out-model", "/data/x/model"],
                            nodes=4, gpus_per_node=8, cpu="64", memory="900Gi", pvc="gramline-data", pvc_mount="/data", run_id="5f0c6d6e-8a1b-4c8e-9e3a-2b7d1c0e9f11", namespace="kubeflow",
                            s3_secret="gramline-s3", shm="64Gi", run_as_user=1000)
    cpu_only = trainjob_manifest(name=trainjob_name("align", "r"), stage="align", image=IMAGE, stage_args=[],
                                 nodes=2, gpus_per_node=0, cpu=None, memory=None, pvc=None, pvc_mount="/data",
                                 run_id="r")
    for obj in (gpu, cpu_only):
        assert crd_errors(obj) == []
    spec = gpu["spec"]["trainer"]
    assert spec["numNodes"] == 4 and spec["numProcPerNode"] == 8
    assert spec["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": 8, "cpu": "64", "memory": "900Gi"}
    assert spec["command"][-2:] == ["-m", "gramline.stages.pretrain"]
    pod = gpu["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = pod["template"]["spec"]["template"]["spec"]
    claim = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert claim["persistentVolumeClaim"]["claimName"] == "gramline-data"
    assert {"name": claim["name"], "mountPath": "/data"} in pod["containers"][0]["volumeMounts"]
    assert pod["securityContext"]["runAsUser"] == 1000
    assert cpu_only["spec"]["trainer"]["numProcPerNode"] == 1 and "runtimePatches" not in cpu_only["spec"]
    # the strict check is real: the pre-2.2 override field and a bad quantity are refused
    old = json.loads(json.dumps(gpu))
    old["spec"]["podSpecOverrides"] = [{"targetJobs": [{"name": "node"}]}]
    bad = json.loads(json.dumps(cpu_only))
    bad["spec"]["trainer"]["resourcesPerNode"] = {"requests": {"cpu": "lots"}}
    assert any("podSpecOverrides" in e for e in crd_errors(old))
    assert any("resourcesPerNode" in e for e in crd_errors(bad))


def test_trainjob_names_are_deterministic_valid_and_distinct() -> None:
    ids = ["5f0c6d6e-8a1b-4c8e-9e3a-2b7d1c0e9f11", "RUN_ID.with.dots", "x" * 200, "---"]
    for run_id in ids:
        for stage in TRAINING_STAGES:
            name = trainjob_name(stage, run_id)
            assert name == trainjob_name(stage, run_id)
            assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
    names = {trainjob_name(stage, run_id) for stage in TRAINING_STAGES for run_id in ids}
    assert len(names) == len(TRAINING_STAGES) * len(ids)


# --------------------------------------------------------------------------- Kubernetes API stand-in


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrainerStandin:
    """TrainJobs in memory; each node a process; requests recorded as (method, path)."""

    def __init__(self, workdir: Path) -> None:
        self.jobs: dict[tuple[str, str], dict] = {}
        self.nodes: dict[tuple[str, str], list[tuple[subprocess.Popen, Path]]] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.unavailable = 0  # answer this many TrainJob reads with 503 (an API server restarting)
        self.workdir = workdir
        self.lock = threading.Lock()

    def start_nodes(self, key: tuple[str, str], job: dict) -> None:
        trainer = job["spec"]["trainer"]
        command = trainer["command"]
        if command[0] == "python":  # the image's Python is this environment's
            command = [sys.executable, *command[1:]]
        port = free_port()
        procs = []
        for rank in range(trainer["numNodes"]):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PET_NNODES": str(trainer["numNodes"]),
                   "PET_NPROC_PER_NODE": str(trainer.get("numProcPerNode", 1)), "PET_NODE_RANK": str(rank),
                   "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
            env.update({e["name"]: e["value"] for e in trainer.get("env", []) if "value" in e})
            log = self.workdir / f"{key[1]}-node-{rank}.log"
            with open(log, "wb") as out:
                procs.append((subprocess.Popen([*command, *trainer.get("args", [])], env=env, stdout=out,
                                               stderr=subprocess.STDOUT, start_new_session=True), log))
        self.nodes[key] = procs

    def refresh(self, key: tuple[str, str]) -> dict:
        job = self.jobs[key]
        codes = [proc.poll() for proc, _ in self.nodes[key]]
        done = [code for code in codes if code is not None]
        status: dict[str, Any] = {"jobsStatus": [{
            "name": "node", "active": 1 if len(done) < len(codes) else 0, "ready": 1 if len(done) < len(codes) else 0,
            "succeeded": 1 if codes and all(c == 0 for c in codes) else 0,
            "failed": 1 if any(c not in (None, 0) for c in codes) else 0, "suspended": 0}]}
        now = "2026-01-01T00:00:00Z"
        if any(c not in (None, 0) for c in codes):
            for proc, _ in self.nodes[key]:  # JobSet fails the whole set
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            status["conditions"] = [{"type": "Failed", "status": "True", "reason": "FailedJobs",
                                     "message": JOBSET_FAILED, "lastTransitionTime": now}]
        elif codes and all(c == 0 for c in codes):
            status["conditions"] = [{"type": "Complete", "status": "True", "reason": "AllJobsCompleted",
                                     "message": "jobset completed successfully", "lastTransitionTime": now}]
        job["status"] = status
        return job

    def stop(self) -> None:
        for procs in self.nodes.values():
            for proc, _ in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def created(self) -> int:
        return sum(1 for method, path, code in self.requests if method == "POST" and code == 201)


def handler_for(standin: TrainerStandin) -> type[BaseHTTPRequestHandler]:
    jobs_path = re.compile(r"/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?")
    pods_path = re.compile(r"/api/v1/namespaces/([^/]+)/pods(?:/([^/]+)/log)?")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def reply(self, code: int, body: Any, content_type: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            standin.requests.append((self.command, self.path, code))
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def status(self, code: int, reason: str, message: str) -> None:
            self.reply(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                              "reason": reason, "code": code})

        def do_POST(self) -> None:
            match = jobs_path.fullmatch(urllib.parse.urlparse(self.path).path)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if not match or match.group(2):
                return self.status(404, "NotFound", "the server could not find the requested resource")
            key = (match.group(1), body["metadata"]["name"])
            with standin.lock:
                errors = crd_errors(body)
                if errors:
                    return self.status(422, "Invalid", f"TrainJob.trainer.kubeflow.org {key[1]!r} is invalid: "
                                       + "; ".join(errors))
                if key in standin.jobs:
                    return self.status(409, "AlreadyExists", f"trainjobs.trainer.kubeflow.org {key[1]!r} already exists")
                body["metadata"]["namespace"] = key[0]
                standin.jobs[key] = body
                standin.start_nodes(key, body)
                self.reply(201, body)

        def do_GET(self) -> None:
            url = urllib.parse.urlparse(self.path)
            match, pods = jobs_path.fullmatch(url.path), pods_path.fullmatch(url.path)
            with standin.lock:
                if match and match.group(2) and standin.unavailable > 0:
                    standin.unavailable -= 1
                    return self.status(503, "ServiceUnavailable", "the server is currently unable to handle the request")
                if match and match.group(2) and (match.group(1), match.group(2)) in standin.jobs:
                    return self.reply(200, standin.refresh((match.group(1), match.group(2))))
                if pods and not pods.group(2):
                    selector = dict(item.split("=") for item in
                                    urllib.parse.parse_qs(url.query)["labelSelector"][0].split(","))
                    name = selector["jobset.sigs.k8s.io/jobset-name"]
                    known = (pods.group(1), name) in standin.nodes and selector.get(
                        "batch.kubernetes.io/job-completion-index") == "0"
                    items = [{"metadata": {"name": f"{name}-node-0-0", "namespace": pods.group(1)}}] if known else []
                    return self.reply(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
                if pods and pods.group(2):
                    name = pods.group(2).removesuffix("-node-0-0")
                    lines = int(urllib.parse.parse_qs(url.query).get("tailLines", ["1000000"])[0])
                    text = standin.nodes[(pods.group(1), name)][0][1].read_text(errors="replace")
                    return self.reply(200, "\n".join(text.splitlines()[-lines:]) + "\n", "text/plain")
            self.status(404, "NotFound", f"{url.path} not found")

        def do_DELETE(self) -> None:
            match = jobs_path.fullmatch(urllib.parse.urlparse(self.path).path)
            key = (match.group(1), match.group(2)) if match else None
            with standin.lock:
                if key not in standin.jobs:
                    return self.status(404, "NotFound", "not found")
                for proc, _ in standin.nodes.pop(key):
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                del standin.jobs[key]
                self.reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

    return Handler


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[tuple[TrainerStandin, Path]]:
    """The stand-in and a kubeconfig pointing at it (namespace `team-a`)."""
    state = TrainerStandin(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "standin",
        "clusters": [{"name": "standin", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "me", "user": {"token": "x"}}],
        "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "me", "namespace": "team-a"}}]}))
    try:
        yield state, kubeconfig
    finally:
        server.shutdown()
        state.stop()


def launch(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gramline.kfp.trainjob", "--kubeconfig", str(kubeconfig),
                           "--poll-s", "0.5", *args], check=False, capture_output=True, text=True, timeout=600)


# --------------------------------------------------------------------------- the launcher


@pytest.mark.slow
def test_kfp_task_trains_pretrain_on_two_nodes_and_a_retry_reattaches_standin(
        standin: tuple[TrainerStandin, Path], small_dataset: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The multinode component run by kfp.local: launcher → API → two torchrun nodes → shared volume →
    the task's Model output; then the same launch again (a KFP retry) attaches to that TrainJob."""
    state, kubeconfig = standin
    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    component = multinode_component("pretrain", IMAGE, nodes=2, gpus_per_node=0, cpu="1", memory="2Gi",
                                    shared_root=str(shared), pvc="gramline-data", pvc_mount=str(tmp_path),
                                    timeout_s=500)

    @dsl.pipeline
    def one(dataset_dir: str) -> None:
        data = dsl.importer(artifact_uri=dataset_dir, artifact_class=dsl.Dataset)
        component(dataset=data.output, preset="tiny", overrides=QUICK, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)

    with local_run.host_subprocess_runner() as runner:
        local.init(runner=runner, pipeline_root=str(tmp_path / "root"))
        one(dataset_dir=str(small_dataset))
    assert state.created() == 1
    (namespace, name), job = next(iter(state.jobs.items()))
    assert namespace == "team-a" and crd_errors(job) == []
    work = shared / name
    manifest = json.loads((work / "model" / "manifest.json").read_text())
    assert manifest["step"] == QUICK["train.steps"]
    state_dir = work / "model" / "state" / f"step-{QUICK['train.steps']:08d}"
    assert sorted(p.name for p in state_dir.glob("rank-*.pt")) == ["rank-0.pt", "rank-1.pt"]  # world size 2
    assert [e["path"] for e in manifest["inputs"]] == [str(work / "inputs" / "dataset")]  # read on the volume
    outputs = list((tmp_path / "root").rglob("model/manifest.json"))
    assert len(outputs) == 1 and json.loads(outputs[0].read_text()) == manifest  # the task's Model artifact
    # the nodes' KFP UI file (TensorBoard viewer) comes back as the launcher's own output, naming the
    # KFP Model's URI, whose event files came back with the Model
    (task_dir,) = [p.parent for p in (tmp_path / "root").glob("*/pretrain/executor_output.json")]
    artifacts = {name: value["artifacts"][0] for name, value in
                 json.loads((task_dir / "executor_output.json").read_text())["artifacts"].items()}
    model, ui = artifacts["model"], artifacts["mlpipeline_ui_metadata"]
    logdir = model["uri"] + "/tensorboard"
    assert json.loads(Path(ui["uri"]).read_text()) == {"outputs": [{"type": "tensorboard", "source": logdir}]}
    assert model["metadata"]["tensorboard_logdir"] == logdir and model["metadata"]["trainjob"]
    assert list(Path(logdir).glob("events.out.tfevents.*"))

    # a retried launcher (same run id) attaches instead of creating a second TrainJob
    run_id = job["metadata"]["annotations"]["gramline.dev/run-id"]
    again = tmp_path / "again" / "model"
    done = launch(kubeconfig, "--stage", "pretrain", "--image", IMAGE, "--nodes", "2", "--shared-root", str(shared),
                  "--pvc", "gramline-data", "--run-id", run_id, "--input", f"dataset={small_dataset}",
                  "--out-model", str(again), "--executor-output", str(tmp_path / "again" / "out.json"),
                  "--output-uri", "model=s3://bucket/run/pretrain/model", "--",
                  "--dataset", str(small_dataset), "--out-model", str(again), "--preset", "tiny")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "attached to existing TrainJob" in done.stdout
    assert state.created() == 1 and ("POST", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs",
                                     409) in state.requests
    assert json.loads((again / "manifest.json").read_text()) == manifest
    executor = json.loads((tmp_path / "again" / "out.json").read_text())["artifacts"]["model"]["artifacts"][0]
    assert executor["uri"] == "s3://bucket/run/pretrain/model"
    assert executor["metadata"]["trainjob"] == f"team-a/{name}"


def test_failed_trainjob_exits_1_with_its_message_and_a_retry_starts_it_again_standin(
        standin: tuple[TrainerStandin, Path], small_dataset: Path, tmp_path: Path) -> None:
    state, kubeconfig = standin
    shared = tmp_path / "shared"
    shared.mkdir()
    argv = ["--stage", "pretrain", "--image", IMAGE, "--nodes", "2", "--shared-root", str(shared),
            "--run-id", "run-7", "--input", f"dataset={small_dataset}", "--out-model", str(tmp_path / "out"),
            "--", "--dataset", str(small_dataset), "--out-model", str(tmp_path / "out"), "--preset", "no-such-preset"]
    state.unavailable = 3  # a short API outage while it waits is ridden out
    done = launch(kubeconfig, *argv)
    assert done.returncode == 1, done.stdout + done.stderr
    assert JOBSET_FAILED in done.stderr and "FailedJobs" in done.stderr
    assert "no-such-preset" in done.stdout  # the rank-0 node's own error, from its log
    assert not (tmp_path / "out").exists()
    assert sum(1 for method, _, code in state.requests if method == "GET" and code == 503) == 3

    again = launch(kubeconfig, *argv)
    assert again.returncode == 1
    assert "deleting it and starting again" in again.stdout
    assert state.created() == 2 and len(state.jobs) == 1
    assert sum(1 for method, _, code in state.requests if method == "DELETE" and code == 200) == 1


def flags(values: dict[str, str]) -> list[str]:
    return [item for pair in values.items() for item in pair]


def test_bad_inputs_exit_2_and_name_the_field_standin(standin: tuple[TrainerStandin, Path], small_dataset: Path,
                                                      tmp_path: Path) -> None:
    state, kubeconfig = standin
    shared = tmp_path / "shared"
    shared.mkdir()
    base = {"--stage": "gram", "--image": IMAGE, "--nodes": "2", "--shared-root": str(shared), "--run-id": "r1",
            "--input": f"dataset={small_dataset}", "--out-model": str(tmp_path / "out")}
    cases = [({"--nodes": "0"}, "--nodes 0"), ({"--stage": "curate"}, "--stage 'curate'"),
             ({"--shared-root": str(tmp_path / "absent")}, "--shared-root"),
             ({"--image": " "}, "--image"),
             ({"--input": f"dataset={tmp_path}"}, f"--input dataset={tmp_path}")]
    for change, named in cases:
        args = flags({**base, **change})
        done = launch(kubeconfig, *args)
        assert done.returncode == 2 and named in done.stderr, (change, done.stderr)
    assert state.requests == []  # refused before any API call
    # a quantity the API server refuses (422) is a bad input too
    args = flags({**base, "--cpu": "lots"})
    done = launch(kubeconfig, *args)
    assert done.returncode == 2 and "resourcesPerNode" in done.stderr and "rejected" in done.stderr
    assert state.created() == 0


# --------------------------------------------------------------------------- the KFP component


def test_the_launcher_needs_no_kfp() -> None:
    """The launcher runs in the stage image, which has the kubernetes client but not the pipeline SDK."""
    code = "import sys; sys.modules['kfp'] = None; import gramline.kfp.trainjob as t; t.parser()"
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def interface(component: Any) -> dict[str, Any]:
    spec = component.component_spec
    return {"inputs": {k: (v.type, v.default, v.optional) for k, v in (spec.inputs or {}).items()},
            "outputs": {k: v.type for k, v in (spec.outputs or {}).items()}, "name": spec.name}


def compiled(component: Any, path: Path) -> dict:
    """The component's container as the KFP compiler writes it."""
    compiler.Compiler().compile(component, str(path))
    return next(iter(yaml.safe_load(path.read_text())["deploymentSpec"]["executors"].values()))["container"]


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_multinode_component_has_the_single_node_interface_and_compiles(stage: str, tmp_path: Path) -> None:
    single = build_components(IMAGE, {stage: 16}, "s3://bucket/state")[stage]
    multi = multinode_component(stage, IMAGE, nodes=2, gpus_per_node=8, cpu="32", memory="256Gi",
                                shared_root="/data/jobs", pvc="gramline-data", state_root="s3://bucket/state")
    assert interface(multi) == interface(single) == interface(build_components(IMAGE)[stage])
    container, own = (compiled(component, tmp_path / f"{stage}-{i}.yaml") for i, component in enumerate((multi, single)))
    args = container["args"]
    # the stage's own arguments follow `--` unchanged
    assert args[args.index("--") + 1:] == own["args"]
    assert container["command"] == ["python", "-m", "gramline.kfp.trainjob"]
    assert args[args.index("--run-id") + 1] == "{{$.inputs.parameters['run_id']}}"


def test_compile_with_nodes_2_gives_launchers_whose_trainjobs_validate_against_the_crd(tmp_path: Path) -> None:
    """`pipeline/compile.py --nodes 2`: every training task is the launcher, asks for no GPU itself, and
    the TrainJob its compiled command line asks for (placeholders filled as the driver would) validates
    against the Trainer CRD schema with 2 nodes of the profile's GPUs and the node service account."""
    out = tmp_path / "gramline.yaml"
    done = subprocess.run([sys.executable, str(REPO / "pipeline" / "compile.py"), "--profile", "vitl16", "--output",
                           str(out), "--nodes", "2", "--pvc", "gramline-data", "--node-service-account",
                           "gramline-runner"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    ir, platform = list(yaml.safe_load_all(out.read_text()))
    executors = ir["deploymentSpec"]["executors"]
    for stage in TRAINING_STAGES:
        container = executors[f"exec-{stage}"]["container"]
        assert container["command"] == ["python", "-m", "gramline.kfp.trainjob"]
        assert "accelerator" not in container.get("resources", {})
        filled = [re.sub(r"\{\{\$[^}]*\}\}", "x", arg) if isinstance(arg, str) else "x"
                  for arg in container["args"]]
        args = trainjob.parser().parse_args(filled)
        node_args = args.stage_args[1:]
        body = trainjob.manifest_of(args, trainjob.trainjob_name(stage, "123"), node_args)
        assert crd_errors(body) == []
        assert body["spec"]["trainer"]["numNodes"] == 2
        gpus = body["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"]
        assert gpus == body["spec"]["trainer"]["numProcPerNode"] >= 1
        pod = body["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
        assert pod["template"]["spec"]["template"]["spec"]["serviceAccountName"] == "gramline-runner"
        # every node's processes together: the stage sees the whole world's GPU count
        assert node_args[node_args.index("--gpus") + 1] == str(2 * gpus)
    assert "curate" in ir["root"]["dag"]["tasks"]
    assert platform  # the PVC and the rest of the Kubernetes settings
    no_pvc = subprocess.run([sys.executable, str(REPO / "pipeline" / "compile.py"), "--output", str(out),
                             "--nodes", "2"], capture_output=True, text=True, check=False)
    assert no_pvc.returncode == 2 and "--nodes 2" in no_pvc.stderr and "--pvc" in no_pvc.stderr


def test_multinode_component_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="curate"):
        multinode_component("curate", IMAGE, 2, 8, None, None, "/data")
    with pytest.raises(ValueError, match="nodes"):
        multinode_component("pretrain", IMAGE, 0, 8, None, None, "/data")
    with pytest.raises(ValueError, match="shared_root"):
        multinode_component("pretrain", IMAGE, 2, 8, None, None, "data")
    with pytest.raises(ValueError, match="shared_root"):
        multinode_component("pretrain", IMAGE, 2, 8, None, None, "/elsewhere", pvc="gramline-data", pvc_mount="/data")
    with pytest.raises(InputError, match="--image"):
        multinode_component("pretrain", "Not An Image", 2, 8, None, None, "/data")
