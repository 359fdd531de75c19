"""Run one gramline training stage on N nodes as a Kubeflow Trainer v2 TrainJob, from a KFP task.

    python -m gramline.kfp.trainjob --stage pretrain --image IMG --nodes 2 --gpus-per-node 8
        --shared-root /data/gramline-trainjobs --pvc gramline-data [--pvc-mount /data] --run-id RUN
        --input dataset=LOCAL_DIR --out-model LOCAL_DIR [--out-ui-metadata FILE] [--executor-output FILE]
        [--output-uri model=URI ...] -- STAGE_ARGS...

A KFP task is one pod, so this launcher task creates a TrainJob (trainer.kubeflow.org/v1alpha1,
https://www.kubeflow.org/docs/components/trainer/) on the `torch-distributed` runtime, which runs
`python -m torch.distributed.run -m gramline.stages.<stage> STAGE_ARGS` (torchrun) on every node
(the runtime sets torchrun's PET_* variables). The nodes cannot see the launcher's local artifact copies, so the launcher first copies
each input artifact to `<shared-root>/<trainjob>/inputs/<name>` on storage both mount (an RWX PVC), and
the stage writes its Model (with checkpoints) to `<shared-root>/<trainjob>/model`. The launcher
waits, prints the TrainJob's conditions as they change (and the rank-0 pod's last log lines at the
end), then copies the Model (and the stage's KFP UI file, `mlpipeline_ui_metadata`, whose TensorBoard
source is already the KFP Model's URI) into its KFP outputs and writes the executor output.

The TrainJob's name comes from the KFP run id and the stage, so a retried launcher re-attaches to the
TrainJob it created before; one that Failed is deleted and created again, and the stage resumes
from its last checkpoint in the shared Model directory.

It runs in the gramline image and needs the `kubernetes` client there, not kfp (the image reference
was checked when the component was built).

Exit codes: 0 done; 1 the TrainJob failed, timed out or the Kubernetes API refused a call; 2 bad
inputs (gramline.errors).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gramline.artifacts import MANIFEST
from gramline.errors import InputError
from gramline.io import atomic_path, emptied_dir
from gramline.kfp.profiles import LABEL_VALUE, S3_SECRET_KEYS
from gramline.stages import TRAINING_STAGES
from gramline.stages.common import (
    UI_METADATA,
    StageArgumentParser,
    emit_executor_output,
    parse_named,
    run_stage,
)

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
RUNTIME = "torch-distributed"
NODE = "node"  # the torch-distributed runtime's replicated job and trainer container
PATCH_MANAGER = "gramline.dev/kfp-launcher"
LABEL_STAGE, LABEL_RUN = "gramline.dev/stage", "gramline.dev/run-id"
SHARED_VOLUME = "gramline-shared"
UI_METADATA_FILE = "ui-metadata.json"  # the stage's KFP UI file, as the nodes write it under the TrainJob's directory
MAX_API_ERRORS = 20  # consecutive failed status reads (5xx, 429, unreachable) before giving up
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class TrainJobFailed(Exception):
    """The TrainJob failed, timed out, or the API refused a call: exit 1."""


def trainjob_name(stage: str, run_id: str) -> str:
    """`gramline-<stage>-<run id>`, a valid TrainJob name (RFC 1035 label, at most 63 characters);
    an id that does not fit is replaced by a hash of it."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")
    name = f"gramline-{stage}-{slug}"
    if not slug or len(name) > 63:
        name = f"gramline-{stage}-{hashlib.sha256(run_id.encode()).hexdigest()[:16]}"
    return name


def trainjob_manifest(*, name: str, stage: str, image: str, stage_args: Sequence[str], nodes: int,
                      gpus_per_node: int, cpu: str | None, memory: str | None, pvc: str | None, pvc_mount: str,
                      run_id: str, namespace: str | None = None, runtime: str = RUNTIME,
                      s3_secret: str | None = None, shm: str | None = None,
                      run_as_user: int | None = None, service_account: str | None = None) -> dict[str, Any]:
    """The TrainJob that runs `<stage> <stage_args>` under torchrun on `nodes` nodes, each with
    `gpus_per_node` GPUs (one process per GPU; one process on a CPU-only node) and the claim `pvc`
    mounted at `pvc_mount` (None: the runtime provides the shared volume); `run_as_user`: the pods'
    user and group (None: the image's), the same as the launcher's so that both can write the volume;
    `service_account`: the pods' ServiceAccount (for IRSA, the annotated one; None: the runtime's)."""
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    if gpus_per_node:
        limits["nvidia.com/gpu"] = gpus_per_node
    for key, value in (("cpu", cpu), ("memory", memory)):
        if value:
            requests[key] = limits[key] = value
    env: list[dict[str, Any]] = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if s3_secret:
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": s3_secret, "key": key, "optional": True}}}
                for key in S3_SECRET_KEYS]
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if pvc:
        volumes.append({"name": SHARED_VOLUME, "persistentVolumeClaim": {"claimName": pvc}})
        mounts.append({"name": SHARED_VOLUME, "mountPath": pvc_mount})
    if shm:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    labels = {"app.kubernetes.io/part-of": "gramline", LABEL_STAGE: stage}
    if LABEL_VALUE.fullmatch(run_id):
        labels[LABEL_RUN] = run_id
    metadata: dict[str, Any] = {"name": name, "labels": labels, "annotations": {"gramline.dev/run-id": run_id}}
    if namespace:
        metadata["namespace"] = namespace
    spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": runtime},
        "trainer": {
            "image": image,
            # torchrun as a module: the workers run the Python gramline is installed in
            "command": ["python", "-m", "torch.distributed.run", "-m", f"gramline.stages.{stage}"],
            "args": [str(arg) for arg in stage_args],
            "numNodes": nodes,
            "numProcPerNode": max(gpus_per_node, 1),
            "resourcesPerNode": {key: value for key, value in (("limits", limits), ("requests", requests)) if value},
            "env": env,
        },
    }
    pod: dict[str, Any] = {}
    if volumes:
        pod.update(volumes=volumes, containers=[{"name": NODE, "volumeMounts": mounts}])
    if run_as_user is not None:
        pod["securityContext"] = {"runAsUser": run_as_user, "runAsGroup": run_as_user, "runAsNonRoot": run_as_user > 0}
    if service_account:
        pod["serviceAccountName"] = service_account
    if pod:
        job = {"name": NODE, "template": {"spec": {"template": {"spec": pod}}}}
        spec["runtimePatches"] = [{"manager": PATCH_MANAGER,
                                   "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [job]}}}}]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainJob", "metadata": metadata, "spec": spec}


def condition(job: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    """The TrainJob's condition of type `kind` when its status is True."""
    for item in (job.get("status") or {}).get("conditions") or []:
        if item.get("type") == kind and item.get("status") == "True":
            return item
    return None


def stage_copy(source: Path, target: Path) -> None:
    """Copy an artifact directory to `target` atomically; one already there with the same manifest stays."""
    if (target / MANIFEST).is_file() and (target / MANIFEST).read_bytes() == (source / MANIFEST).read_bytes():
        return
    with atomic_path(target) as tmp:
        shutil.copytree(source, tmp)


def copy_model(source: Path, target: Path) -> None:
    """Copy the Model into the KFP output directory in place (it may be a mount), manifest last."""
    emptied_dir(target)
    shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST))
    shutil.copy2(source / MANIFEST, target / MANIFEST)


class Cluster:
    """The few Kubernetes API calls the launcher makes (kubernetes Python client)."""

    def __init__(self, kubeconfig: str | None) -> None:
        from kubernetes import client, config

        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig)
        else:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
        self.custom = client.CustomObjectsApi()
        self.core = client.CoreV1Api()

    @staticmethod
    def default_namespace(kubeconfig: str | None) -> str:
        if not kubeconfig and IN_CLUSTER_NAMESPACE.is_file():
            return IN_CLUSTER_NAMESPACE.read_text().strip()
        from kubernetes import config

        try:
            _, active = config.list_kube_config_contexts(config_file=kubeconfig)
        except config.ConfigException:
            return "default"
        return active.get("context", {}).get("namespace") or "default"

    def create(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def delete(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                    propagation_policy="Foreground")

    def rank0_log(self, namespace: str, name: str, lines: int) -> str:
        selector = (f"jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name={NODE},"
                    "batch.kubernetes.io/job-completion-index=0")
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        if not pods:
            return ""
        return self.core.read_namespaced_pod_log(pods[0].metadata.name, namespace, container=NODE, tail_lines=lines)


def _api_failure(err: Exception, what: str) -> Exception:
    """An ApiException as an InputError (422: the object is invalid; 404 on create: no TrainJob CRD)
    or a TrainJobFailed (403, 5xx, ...), with the API server's message."""
    status = getattr(err, "status", None)
    try:
        message = json.loads(getattr(err, "body", "") or "{}").get("message") or str(err)
    except ValueError:
        message = str(err)
    if status == 422:
        return InputError(what, f"was rejected by the Kubernetes API ({message})", "a valid TrainJob")
    if status == 404:
        return InputError(what, f"failed: {message}",
                          "Kubeflow Trainer v2 installed (the trainjobs.trainer.kubeflow.org CRD)")
    hint = " (the task's service account needs the trainjobs rules of manifests/base/rbac.yaml)" if status == 403 else ""
    return TrainJobFailed(f"{what} failed: HTTP {status}: {message}{hint}")


def create_or_attach(cluster: Cluster, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """Create the TrainJob; if one of that name exists (a retried launcher), attach to it, or when
    it Failed, delete it, wait until it is gone and create it again."""
    from kubernetes.client.exceptions import ApiException

    name, stage = body["metadata"]["name"], body["metadata"]["labels"][LABEL_STAGE]
    for _ in range(2):
        try:
            job = cluster.create(namespace, body)
            print(f"[trainjob] created TrainJob {namespace}/{name}", flush=True)
            return job
        except ApiException as err:
            if err.status != 409:
                raise _api_failure(err, f"creating TrainJob {namespace}/{name}") from None
        job = cluster.get(namespace, name)
        if ((job.get("metadata") or {}).get("labels") or {}).get(LABEL_STAGE) != stage:
            raise InputError(f"TrainJob {namespace}/{name}", "exists but was not made by this gramline stage",
                             f"a TrainJob labelled {LABEL_STAGE}={stage}, or none")
        failed = condition(job, "Failed")
        if not failed:
            print(f"[trainjob] attached to existing TrainJob {namespace}/{name}", flush=True)
            return job
        print(f"[trainjob] TrainJob {namespace}/{name} had failed ({failed.get('reason')}: {failed.get('message')});"
              " deleting it and starting again from the last checkpoint", flush=True)
        cluster.delete(namespace, name)
        _wait_gone(cluster, namespace, name)
    raise TrainJobFailed(f"TrainJob {namespace}/{name} could not be created again after deleting it")


def _wait_gone(cluster: Cluster, namespace: str, name: str, timeout_s: float = 600) -> None:
    from kubernetes.client.exceptions import ApiException

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            cluster.get(namespace, name)
        except ApiException as err:
            if err.status == 404:
                return
            raise _api_failure(err, f"reading TrainJob {namespace}/{name}") from None
        time.sleep(1)
    raise TrainJobFailed(f"TrainJob {namespace}/{name} was still there {timeout_s:.0f}s after deleting it")


def wait(cluster: Cluster, namespace: str, name: str, poll_s: float, timeout_s: float) -> dict[str, Any]:
    """Poll until Complete (returned) or Failed (TrainJobFailed), printing each change of status."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    seen: set[str] = set()
    errors = 0
    while True:
        try:
            job = cluster.get(namespace, name)
            errors = 0
        except ApiException as err:
            if err.status == 404:
                raise TrainJobFailed(f"TrainJob {namespace}/{name} is gone (deleted while it ran?)") from None
            if err.status not in (429, 500, 502, 503, 504) or errors >= MAX_API_ERRORS:
                raise _api_failure(err, f"reading TrainJob {namespace}/{name}") from None
            errors += 1
            time.sleep(poll_s)
            continue
        except HTTPError as err:  # the API server unreachable for a moment
            if errors >= MAX_API_ERRORS:
                raise TrainJobFailed(f"reading TrainJob {namespace}/{name} failed {errors + 1} times: {err}") from None
            errors += 1
            time.sleep(poll_s)
            continue
        status = job.get("status") or {}
        lines = ["jobs {name}: active={active} ready={ready} succeeded={succeeded} failed={failed}".format_map(
            {key: item.get(key, 0) for key in ("name", "active", "ready", "succeeded", "failed")})
            for item in status.get("jobsStatus") or []]
        lines += [f"condition {item.get('type')}={item.get('status')} {item.get('reason', '')}: {item.get('message', '')}"
                  for item in status.get("conditions") or []]
        for line in lines:
            if line not in seen:
                seen.add(line)
                print(f"[trainjob] {name}: {line}", flush=True)
        if condition(job, "Complete"):
            return job
        failed = condition(job, "Failed")
        if failed:
            raise TrainJobFailed(f"TrainJob {namespace}/{name} failed: {failed.get('reason')}: {failed.get('message')}")
        if deadline is not None and time.monotonic() > deadline:
            raise TrainJobFailed(f"TrainJob {namespace}/{name} did not finish within {timeout_s:.0f}s "
                                 f"(it keeps running; `kubectl -n {namespace} get trainjob {name}`)")
        time.sleep(poll_s)


def parser() -> StageArgumentParser:
    p = StageArgumentParser(prog="python -m gramline.kfp.trainjob", description=__doc__.splitlines()[0])
    p.add_argument("--stage", required=True, help=f"one of {', '.join(TRAINING_STAGES)}")
    p.add_argument("--image", required=True, help="image of the training nodes")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs (= processes) per node; 0: one CPU process")
    p.add_argument("--cpu", default=None, help="CPU per node (Kubernetes quantity)")
    p.add_argument("--memory", default=None, help="memory per node (Kubernetes quantity)")
    p.add_argument("--shm", default=None, help="size of a memory-backed /dev/shm per node")
    p.add_argument("--shared-root", type=Path, required=True,
                   help="directory on storage that this pod and every node mount at the same path")
    p.add_argument("--pvc", default=None, help="claim of the shared volume, mounted on the nodes at --pvc-mount")
    p.add_argument("--pvc-mount", type=Path, default=None, help="where --pvc is mounted (default: --shared-root); "
                   "--shared-root must be inside it")
    p.add_argument("--run-as-user", type=int, default=None, help="the nodes' user and group id (default: the image's)")
    p.add_argument("--s3-secret", default=None, help="Secret whose AWS_* keys the nodes get as env")
    p.add_argument("--service-account", default=None,
                   help="ServiceAccount of the nodes' pods (IRSA: the annotated gramline-runner; default: the runtime's)")
    p.add_argument("--runtime", default=RUNTIME, help=f"ClusterTrainingRuntime (default {RUNTIME})")
    p.add_argument("--namespace", default=None, help="default: this pod's namespace, else the kubeconfig's")
    p.add_argument("--kubeconfig", default=None, help="default: in-cluster config, else ~/.kube/config")
    p.add_argument("--run-id", required=True,
                   help="KFP run id (the component's run_id input, dsl.PIPELINE_JOB_ID_PLACEHOLDER): names the TrainJob")
    p.add_argument("--input", action="append", default=[], metavar="NAME=DIR", help="input artifact, repeatable")
    p.add_argument("--out-model", type=Path, required=True, help="the KFP output Model directory")
    p.add_argument("--out-ui-metadata", type=Path, default=None,
                   help="the KFP output file the stage's --out-ui-metadata names (copied from the nodes' one)")
    p.add_argument("--executor-output", type=Path, default=None)
    p.add_argument("--output-uri", action="append", default=[], metavar="NAME=URI")
    p.add_argument("--poll-s", type=float, default=15.0)
    p.add_argument("--timeout-s", type=float, default=0.0, help="give up waiting after this long; 0: never")
    p.add_argument("--log-lines", type=int, default=200, help="rank-0 log lines printed at the end (0: none)")
    p.add_argument("stage_args", nargs=argparse.REMAINDER, help="-- then the stage's own arguments")
    return p


def _check(args: argparse.Namespace) -> dict[str, Path]:
    if args.stage not in TRAINING_STAGES:
        raise InputError(f"--stage {args.stage!r}", "is not a training stage", " / ".join(TRAINING_STAGES))
    if not args.image.strip():
        raise InputError("--image", "is empty", "the image of the training nodes")
    if args.nodes < 1:
        raise InputError(f"--nodes {args.nodes}", "is below 1", "a node count >= 1")
    if args.gpus_per_node < 0:
        raise InputError(f"--gpus-per-node {args.gpus_per_node}", "is negative", "a GPU count >= 0")
    if not args.run_id.strip():
        raise InputError("--run-id", "is empty", "the KFP run id (the pipeline sets the task's run_id input to "
                         "dsl.PIPELINE_JOB_ID_PLACEHOLDER)")
    if not args.shared_root.is_absolute() or not args.shared_root.is_dir():
        raise InputError(f"--shared-root {args.shared_root}", "is not an existing absolute directory",
                         "the mount path of the shared (ReadWriteMany) volume, mounted in this task too")
    mount = args.pvc_mount or args.shared_root
    if args.pvc and not args.shared_root.is_relative_to(mount):
        raise InputError(f"--shared-root {args.shared_root}", f"is outside --pvc-mount {mount}",
                         "a directory on the shared volume")
    inputs = {name: Path(value) for name, value in parse_named(args.input, "--input").items()}
    for name, path in inputs.items():
        if not (path / MANIFEST).is_file():
            raise InputError(f"--input {name}={path}", f"has no {MANIFEST}", "a gramline artifact directory")
    return inputs


def manifest_of(args: argparse.Namespace, name: str, node_args: Sequence[str]) -> dict[str, Any]:
    """The TrainJob the launcher's parsed command line asks for."""
    return trainjob_manifest(name=name, stage=args.stage, image=args.image, stage_args=node_args, nodes=args.nodes,
                             gpus_per_node=args.gpus_per_node, cpu=args.cpu, memory=args.memory,
                             pvc=args.pvc, pvc_mount=str(args.pvc_mount or args.shared_root), run_id=args.run_id,
                             runtime=args.runtime, s3_secret=args.s3_secret, shm=args.shm,
                             run_as_user=args.run_as_user, service_account=args.service_account)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    stage_args = list(args.stage_args[1:] if args.stage_args[:1] == ["--"] else args.stage_args)
    inputs = _check(args)
    name = trainjob_name(args.stage, args.run_id)
    work = args.shared_root / name
    # the stage's paths as the nodes see them: inputs, Model and executor output on the shared volume
    where = {str(path): str(work / "inputs" / key) for key, path in inputs.items()}
    where[str(args.out_model)] = str(work / "model")
    if args.out_ui_metadata:
        where[str(args.out_ui_metadata)] = str(work / UI_METADATA_FILE)
    if args.executor_output:
        where[str(args.executor_output)] = str(work / "executor-output.json")
    node_args = [where.get(arg, arg) for arg in stage_args]

    cluster = Cluster(args.kubeconfig)
    namespace = args.namespace or Cluster.default_namespace(args.kubeconfig)
    body = manifest_of(args, name, node_args)
    for key, path in inputs.items():
        stage_copy(path, work / "inputs" / key)
    create_or_attach(cluster, namespace, body)
    try:
        wait(cluster, namespace, name, args.poll_s, args.timeout_s)
    except TrainJobFailed as err:
        _print_log(cluster, namespace, name, args.log_lines)
        print(f"error: {err}", file=sys.stderr)
        return 1
    _print_log(cluster, namespace, name, args.log_lines)

    model = work / "model"
    if not (model / MANIFEST).is_file():
        raise TrainJobFailed(f"TrainJob {namespace}/{name} completed but left no Model at {model}")
    copy_model(model, args.out_model)
    metadata: dict[str, Any] = {}
    staged = work / "executor-output.json"
    if staged.is_file():
        metadata = json.loads(staged.read_text())["artifacts"]["model"]["artifacts"][0].get("metadata") or {}
    artifacts: dict[str, tuple[Path, Mapping[str, Any]]] = {
        "model": (args.out_model, {**metadata, "trainjob": f"{namespace}/{name}"})}
    if args.out_ui_metadata:
        if not (work / UI_METADATA_FILE).is_file():
            raise TrainJobFailed(f"TrainJob {namespace}/{name} completed but left no {work / UI_METADATA_FILE}")
        args.out_ui_metadata.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / UI_METADATA_FILE, args.out_ui_metadata)
        artifacts[UI_METADATA] = (args.out_ui_metadata, {})
    emit_executor_output(args, artifacts)
    print(f"[trainjob] Model of TrainJob {namespace}/{name} -> {args.out_model}", flush=True)
    return 0


def _print_log(cluster: Cluster, namespace: str, name: str, lines: int) -> None:
    """The rank-0 pod's last `lines` log lines, best effort (the pods may already be gone)."""
    if lines <= 0:
        return
    try:
        text = cluster.rank0_log(namespace, name, lines)
    except Exception as err:  # noqa: BLE001 - a log we cannot read must not hide the job's outcome
        print(f"[trainjob] could not read the rank-0 log of {name}: {err}", flush=True)
        return
    if text:
        print(f"[trainjob] last {lines} lines of the rank-0 log of {name}:\n{text.rstrip()}", flush=True)


def main_cli(argv: Sequence[str] | None = None) -> None:
    try:
        run_stage(main, argv)
    except TrainJobFailed as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main_cli(None)
