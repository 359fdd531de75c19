"""Deployment profiles: the compiled pipeline's parameter defaults and each task's Kubernetes settings.

A deployment profile is chosen at compile time (`pipeline/compile.py --profile P`, `gramline run
--profile P`; both also take the older name `--preset`). It sets the defaults of the pipeline
parameters (source, the stages' recipe presets and overrides), which a run can still change
(`kfp run submit ... preset=tiny pretrain_overrides='{"train.steps": 50}'`), and the per-task
settings that KFP fixes at compile time: GPU type and count, CPU/memory, the `/dev/shm` emptyDir,
S3 credentials from a Secret, an optional PVC, node selector, tolerations, retries with backoff,
timeouts and caching. The stages' recipe presets (gramline/presets.py) are another thing: a
profile names one as the default of the `preset` parameter. The compile options of
`add_scheduling_options` (`--train-gpus`, `--gpu-product`, `--node-selector`, `--toleration`,
`--queue`, ...) adjust a profile (`customize`); the default image is the profile's variant tagged by
content (`image_reference`, which images/build.py tags with too).

Caching: training stages (pretrain, gram, highres, distill, align) never come from the cache, nor does curate (its
source URI can name a bucket whose content changed). anchor and benchmark are pure functions of
their input artifacts and parameters, so KFP's cache key (which includes them) is safe.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gramline.errors import InputError
from gramline.stages import TRAINING_STAGES

# Keys of the gramline-s3 Secret (manifests/overlays/*/s3.env.example, a secretGenerator); boto3 reads them from the env.
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
GPU_RESOURCE = "nvidia.com/gpu"
REPO = Path(__file__).resolve().parents[2]  # the checkout (images/build.py hashes the same files)
IMAGE_NAMES = {"cpu": "gramline", "cuda": "gramline-cuda"}  # images/Dockerfile.cpu, images/Dockerfile
IMAGE_INPUTS = ("pyproject.toml", "constraints.txt", "images/Dockerfile", "images/Dockerfile.cpu")
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # set by NVIDIA GPU feature discovery
GPU_TAINT = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}  # tolerated by every GPU task
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"  # https://kueue.sigs.k8s.io/docs/tasks/run/plain_pods/
SCRATCH_MOUNT = "/scratch"
IMAGE_UID = 1000  # the user images/Dockerfile* create and run as


@dataclass(frozen=True)
class TaskSettings:
    """Kubernetes settings of one task. Sizes are Kubernetes quantities ("8", "64Gi")."""

    cpu: str | None = None
    memory: str | None = None  # also covers the memory-backed /dev/shm
    gpus: int = 0  # a training task with more than one runs one process per GPU (torchrun)
    gpu_product: str | None = None  # node selector nvidia.com/gpu.product; None: any GPU
    ephemeral_storage: str | None = None  # disk-backed emptyDir at SCRATCH_MOUNT (TMPDIR), this sizeLimit
    shm: str | None = None  # /dev/shm emptyDir (medium Memory) size
    timeout_s: int = 0  # pod activeDeadlineSeconds; 0 = none
    retries: int = 0
    backoff: str = "60s"
    backoff_factor: float = 2.0
    backoff_max: str | None = None  # Argo's backoff.maxDuration; None: `retry_window()`
    cache: bool = False

    def retry_window(self) -> str:
        """Argo's backoff.maxDuration for these retries. Argo counts it from the first attempt's start,
        retries no more once it has passed, and bounds a retry's pod deadline by it
        (https://argo-workflows.readthedocs.io/en/latest/fields/#backoff), so by default it covers
        every attempt's full timeout and the backoff waits between them."""
        if self.backoff_max is not None:
            return self.backoff_max
        if not self.timeout_s:
            return "3600s"  # KFP's default
        units = {"s": 1, "m": 60, "h": 3600}
        first = int(self.backoff[:-1]) * units[self.backoff[-1]]
        waits = sum(first * self.backoff_factor ** attempt for attempt in range(self.retries))
        return f"{int((self.retries + 1) * self.timeout_s + waits)}s"


@dataclass(frozen=True)
class DeploymentProfile:
    name: str
    description: str
    source: str  # default of the `source` parameter (curate --source)
    preset: str  # default of the `preset` parameter (SSL recipe preset of pretrain ... benchmark)
    curate_preset: str  # default of the `curate_preset` parameter
    overrides: dict[str, dict[str, Any]]  # default `<stage>_overrides` per stage
    tasks: dict[str, TaskSettings]
    s3_secret: str | None = "gramline-s3"  # Secret mounted as env in every task (optional=True)
    pvc: str | None = None  # claim mounted at pvc_mount in every task
    pvc_mount: str = "/data"
    state_root: str | None = None  # training state (checkpoints) per run: <state_root>/<run id>/<stage>; see with_state_root
    node_selector: dict[str, str] = field(default_factory=dict)  # every task
    tolerations: list[dict[str, Any]] = field(default_factory=list)  # every task (GPU tasks also tolerate GPU_TAINT)
    timm_baseline: str | None = None  # benchmark also compares timm:<name> (public weights, downloaded by timm)
    partition_parallelism: int = 0  # curate partitions run at once (dsl.ParallelFor); 0 = all
    image_variant: str = "cpu"  # the default image: images/Dockerfile.cpu ("cpu") or images/Dockerfile ("cuda")
    queue: str | None = None  # Kueue LocalQueue: pod label QUEUE_LABEL on every task
    image_pull_secrets: tuple[str, ...] = ()
    run_as_user: int | None = IMAGE_UID  # securityContext runAsUser/runAsGroup + runAsNonRoot; None: the image's
    nodes: int = 1  # >1: each training stage runs as a Kubeflow Trainer TrainJob on this many nodes (multinode.py)
    node_service_account: str | None = None  # the TrainJob pods' ServiceAccount (IRSA: gramline-runner)
    imports: dict[str, str] = field(default_factory=dict)  # stage → URI of its output, imported instead (dsl.importer)

    def task(self, stage: str) -> TaskSettings:
        return self.tasks.get(stage, TaskSettings())

    def __str__(self) -> str:
        return self.name


_DAY = 24 * 3600

# Tiny: CPU only, minutes end to end (CI, `gramline run --preset tiny`). The overrides shorten the
# training phases further than the stages' own tiny presets. `init.head_warmup_steps: 0` keeps a run
# with `init_from` valid in 8 steps (the adapt preset's 20 heads-only steps must stay below
# train.steps); from scratch it is the default already, so that run is unchanged.
TINY = DeploymentProfile(
    name="tiny",
    description="CPU, minutes: procedural images, a 4-layer ViT, a few steps per phase",
    source="synthetic:n=320,size=64,seed=0",
    preset="tiny",
    curate_preset="tiny",
    overrides={
        # ~100 eval images: probes above a handful of samples; 3 partitions exercise the fan-out
        "curate": {"split.eval_fraction": 0.3, "partition.count": 3},
        "pretrain": {"train.steps": 8, "train.batch_size": 8, "train.checkpoint_every": 4,
                     "train.teacher_checkpoints": 2, "train.log_every": 2, "init.head_warmup_steps": 0},
        "anchor": {"anchor.images": 16},
        "gram": {"phase.steps": 4, "phase.ramp_steps": 2, "phase.refresh_at": [2], "train.batch_size": 8,
                 "train.checkpoint_every": 2, "train.teacher_checkpoint_every": 2, "train.log_every": 2},
        "highres": {"train.steps": 4, "train.batch_size": 8, "train.checkpoint_every": 2,
                    "train.teacher_checkpoint_every": 2, "train.log_every": 2},
        "distill": {"train.steps": 4, "train.batch_size": 8, "train.checkpoint_every": 2, "train.log_every": 2},
        "align": {"train.steps": 8, "train.batch_size": 16, "train.checkpoint_every": 4, "train.log_every": 2},
        "benchmark": {"linear.epochs": 10, "seg.steps": 20, "dense.images": 8, "report.images": 3},
    },
    tasks={stage: TaskSettings(cpu="2", memory="4Gi", shm="1Gi", timeout_s=3600,
                               cache=stage in ("anchor", "benchmark"))
           for stage in ("curate_plan", "curate_partition", "curate", "pretrain", "anchor", "gram", "highres",
                         "distill", "align", "benchmark")},
    partition_parallelism=2,
    s3_secret=None,  # no retries either: a failing local stage should stop the run at once
)


CPUS_PER_GPU = 12


# Items per curate partition in the GPU profiles: under an hour of one 16-core partition task at
# ~100 large images/s, and at most ~400 partitions for 100M images: the reduce reads their list from
# its executor input, one command-line argument (Linux caps one at 128 KiB, ~250 bytes a partition).
PARTITION_ITEMS = 250_000


def _gpu_profile(name: str, description: str, gpus: int, product: str, memory: str, shm: str,
                 train_days: int, timm_baseline: str) -> DeploymentProfile:
    """A GPU profile. Compile it with `--shards-uri s3://bucket/prefix`: curate then publishes the
    shards there and every training pod streams them, instead of each task downloading the whole
    Dataset artifact (shards included) before it starts."""
    train = TaskSettings(cpu=str(CPUS_PER_GPU * gpus), memory=memory, gpus=gpus, gpu_product=product, shm=shm,
                         timeout_s=train_days * _DAY, retries=2, backoff="120s")
    return DeploymentProfile(
        name=name,
        description=description,
        source="synthetic:n=20000,size=224,seed=0",
        preset=name,
        curate_preset="large",
        overrides={"curate": {"partition.items": PARTITION_ITEMS},
                   **{stage: {} for stage in ("pretrain", "anchor", "gram", "highres", "distill", "align", "benchmark")}},
        # The light tasks take one GPU of any product: curate embeds images with a ViT-S/16 (the large
        # curate preset), anchor and benchmark run the trained backbones over a few hundred to
        # thousands of images. Only the training tasks are pinned to `product`.
        tasks={
            # curate: the plan and the partitions (decode, validate, describe) need CPUs only; the
            # reduce (dedup, embedding, k-means, shards) keeps the GPU
            "curate_plan": TaskSettings(cpu="4", memory="16Gi", timeout_s=6 * 3600, retries=2),
            "curate_partition": TaskSettings(cpu="16", memory="32Gi", timeout_s=12 * 3600, retries=2),
            "curate": TaskSettings(cpu="16", memory="64Gi", gpus=1, shm="16Gi", timeout_s=2 * _DAY, retries=2),
            "pretrain": train,
            "anchor": TaskSettings(cpu="8", memory="64Gi", gpus=1, shm="8Gi", timeout_s=6 * 3600, retries=2,
                                   cache=True),
            "gram": train,
            "highres": train,
            "distill": train,
            "align": train,
            "benchmark": TaskSettings(cpu="8", memory="64Gi", gpus=1, shm="8Gi", timeout_s=_DAY, retries=2,
                                      cache=True),
        },
        timm_baseline=timm_baseline,
        partition_parallelism=32,
        image_variant="cuda",
    )


PROFILES: dict[str, DeploymentProfile] = {
    "tiny": TINY,
    "vits16": _gpu_profile("vits16", "ViT-S/16 on one 80 GB GPU per training task", 1,
                           "NVIDIA-H100-80GB-HBM3", "120Gi", "16Gi", 3, "vit_small_patch16_dinov3.lvd1689m"),
    "vitl16": _gpu_profile("vitl16", "ViT-L/16 on 8x H100 per training task (one node)", 8,
                           "NVIDIA-H100-80GB-HBM3", "900Gi", "64Gi", 7, "vit_large_patch16_dinov3.lvd1689m"),
}
DEFAULT_PROFILE = "vitl16"
PROFILE_FLAG, OLD_PROFILE_FLAG = "--profile", "--preset"  # the option's name, and its older name


def deployment_profile(name: str, pvc: str | None = None, flag: str = PROFILE_FLAG,
                       state_root: str | None = None) -> DeploymentProfile:
    """The profile `name`, with the claim `pvc` mounted in every task when given and its training
    state kept under `state_root` (`with_state_root`); errors name `flag`."""
    if name not in PROFILES:
        kind = "pipeline preset" if flag == OLD_PROFILE_FLAG else "deployment profile"  # the older flag's words
        raise InputError(flag, f"{name!r} is not a {kind}", "one of " + ", ".join(PROFILES))
    profile = PROFILES[name]
    return with_curate_work_root(with_state_root(replace(profile, pvc=pvc) if pvc else profile, state_root))


def with_curate_work_root(profile: DeploymentProfile) -> DeploymentProfile:
    """`profile` keeping curation's partitions and reduce phases on its PVC (`partition.work_root`
    `<pvc_mount>/gramline-curate`, keyed there by plan id), when a PVC is mounted, the curate tasks
    are retried and the profile's curate defaults do not name another root: a retried or re-run
    curation then skips the partitions already complete (gramline.curate.partition)."""
    curate = profile.overrides.get("curate", {})
    retried = any(profile.task(stage).retries for stage in ("curate_partition", "curate"))
    if not profile.pvc or not retried or "partition.work_root" in curate:
        return profile
    return replace(profile, overrides={**profile.overrides,
                                       "curate": {**curate, "partition.work_root": f"{profile.pvc_mount}/gramline-curate"}})


def with_state_root(profile: DeploymentProfile, root: str | None) -> DeploymentProfile:
    """`profile` keeping its training tasks' state under `root` (`--state-root`): s3://bucket/prefix or
    a directory on the profile's PVC, storage that outlives a pod, so that a retried task resumes
    from its last checkpoint (gramline.train.state_sync). None: `<pvc_mount>/gramline-state` when a
    PVC is mounted and the training tasks are retried; otherwise none."""
    if root is None:
        retried = any(profile.task(stage).retries for stage in TRAINING_STAGES)
        return replace(profile, state_root=f"{profile.pvc_mount}/gramline-state") if profile.pvc and retried else profile
    on_pvc = profile.pvc is not None and Path(root).is_absolute() and Path(root).is_relative_to(profile.pvc_mount)
    if not (on_pvc or (root.startswith("s3://") and root[len("s3://"):].strip("/"))):
        raise InputError(f"--state-root {root!r}", "is not storage that outlives a pod",
                         f"s3://bucket/prefix, or a directory under {profile.pvc_mount} with --pvc CLAIM")
    return replace(profile, state_root=root.rstrip("/"))


class _ProfileOption(argparse.Action):
    """Stores the profile name and which of the option's names was typed (for error messages)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.profile_flag = option_string or PROFILE_FLAG


def add_profile_option(parser: argparse.ArgumentParser, default: str) -> None:
    """`--profile NAME` (also spelled `--preset NAME`, its older name) into `args.profile`."""
    parser.add_argument(PROFILE_FLAG, OLD_PROFILE_FLAG, dest="profile", default=default, action=_ProfileOption,
                        metavar="PROFILE", help=f"deployment profile: {', '.join(PROFILES)} (default {default}); "
                                                f"{OLD_PROFILE_FLAG} is its older name")
    parser.set_defaults(profile_flag=PROFILE_FLAG)


# --------------------------------------------------------------------------- scheduling options

_QUANTITY = re.compile(r"[0-9]+(?:\.[0-9]+)?(?:[EPTGMk]|[EPTGMK]i)?")  # Kubernetes resource quantity (no exponent)
_LABEL_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"(?:[a-z0-9](?:[-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}")
LABEL_VALUE = re.compile(rf"(?:{_LABEL_NAME})?")  # a Kubernetes label value (empty, or up to 63)
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def _quantity(value: str, flag: str) -> str:
    if not _QUANTITY.fullmatch(value):
        raise InputError(f"{flag} {value!r}", "is not a Kubernetes quantity", "a size such as 900Gi, 500G or 64Mi")
    return value


def _label(key: str, value: str, flag: str, item: str) -> tuple[str, str]:
    if not _LABEL_KEY.fullmatch(key) or not LABEL_VALUE.fullmatch(value):
        raise InputError(f"{flag} {item!r}", "is not a valid Kubernetes label",
                         "KEY=VALUE, KEY [prefix/]name and VALUE up to 63 letters, digits, '-', '_', '.'")
    return key, value


def parse_node_selector(item: str, flag: str = "--node-selector") -> tuple[str, str]:
    """`KEY=VALUE` → (key, value)."""
    key, sep, value = item.partition("=")
    if not sep:
        raise InputError(f"{flag} {item!r}", "is malformed", "KEY=VALUE")
    return _label(key, value, flag, item)


def parse_toleration(item: str, flag: str = "--toleration") -> dict[str, Any]:
    """`KEY[=VALUE][:EFFECT]` (kubectl taint syntax) → add_toleration's keyword arguments."""
    spec, _, effect = item.partition(":")
    key, sep, value = spec.partition("=")
    _label(key, value, flag, item)
    if effect and effect not in _EFFECTS:
        raise InputError(f"{flag} {item!r}", f"has the effect {effect!r}", "KEY[=VALUE][:EFFECT], EFFECT one of "
                         + ", ".join(_EFFECTS))
    toleration: dict[str, Any] = {"key": key, "operator": "Equal" if sep else "Exists"}
    if sep:
        toleration["value"] = value
    if effect:
        toleration["effect"] = effect
    return toleration


def customize(profile: DeploymentProfile, *, train_gpus: int | None = None, gpu_product: str | None = None,
              memory: str | None = None, ephemeral_storage: str | None = None,
              node_selector: Sequence[str] = (), tolerations: Sequence[str] = (), queue: str | None = None,
              image_pull_secrets: Sequence[str] = (), nodes: int = 1,
              node_service_account: str | None = None, shards_uri: str | None = None,
              from_dataset: str | None = None, from_models: Sequence[str] = (),
              partition_gpus: int | None = None) -> DeploymentProfile:
    """`profile` with the compile options applied (each named by its flag in errors).

    The training tasks take `train_gpus` (their CPUs scale with it), `gpu_product`, `memory` and
    `ephemeral_storage` (per node with `nodes` > 1: each then a TrainJob, whose pods run as
    `node_service_account`); every task takes the node selectors, tolerations, Kueue queue and image
    pull secrets. `shards_uri` becomes curate's default `output.shards_uri`; `from_dataset` and
    `from_models` (STAGE=URI) are artifacts the pipeline imports instead of running their stage.
    `partition_gpus` > 0 gives each curate partition task GPUs and makes curate's default
    `embed.where` "partitions", so that the fan-out embeds the images instead of the one reduce.
    """
    if nodes < 1:
        raise InputError(f"--nodes {nodes}", "is below 1", "1 (one pod per training task) or more nodes")
    if node_service_account is not None:
        _label("name", node_service_account, "--node-service-account", node_service_account)
    if train_gpus is not None and train_gpus < 0:
        raise InputError(f"--train-gpus {train_gpus}", "is negative", "0 (CPU) or more GPUs per training task")
    if partition_gpus is not None and partition_gpus < 0:
        raise InputError(f"--partition-gpus {partition_gpus}", "is negative", "0 or more GPUs per curate partition task")
    if gpu_product is not None:
        _label(GPU_PRODUCT_LABEL, gpu_product, "--gpu-product", gpu_product)
    if queue is not None:
        _label(QUEUE_LABEL, queue, "--queue", queue)
    tasks = dict(profile.tasks)
    for stage in TRAINING_STAGES:
        settings = profile.task(stage)
        if train_gpus is not None:
            cpu = settings.cpu
            if settings.gpus and train_gpus and cpu and cpu.isdigit():
                cpu = str(max(1, int(cpu) * train_gpus // settings.gpus))
            settings = replace(settings, gpus=train_gpus, cpu=cpu)
        if gpu_product is not None:
            settings = replace(settings, gpu_product=gpu_product)
        if memory is not None:
            settings = replace(settings, memory=_quantity(memory, "--memory"))
        if ephemeral_storage is not None:
            settings = replace(settings, ephemeral_storage=_quantity(ephemeral_storage, "--ephemeral-storage"))
        tasks[stage] = settings
    overrides = _with_shards_uri(profile.overrides, shards_uri, from_dataset)
    if partition_gpus is not None:
        tasks["curate_partition"] = replace(profile.task("curate_partition"), gpus=partition_gpus)
        curate = overrides.get("curate", {})
        if partition_gpus and "embed.where" not in curate:
            overrides = {**overrides, "curate": {**curate, "embed.where": "partitions"}}
    return replace(
        profile, tasks=tasks,
        node_selector={**profile.node_selector, **dict(parse_node_selector(item) for item in node_selector)},
        tolerations=[*profile.tolerations, *(parse_toleration(item) for item in tolerations)],
        queue=queue if queue is not None else profile.queue,
        image_pull_secrets=(*profile.image_pull_secrets, *(_label("secret", name, "--image-pull-secret", name)[1]
                                                             for name in image_pull_secrets)),
        nodes=nodes, node_service_account=node_service_account,
        overrides=overrides,
        imports={**profile.imports, **_imports(from_dataset, from_models)})


def _with_shards_uri(overrides: dict[str, dict[str, Any]], uri: str | None,
                     from_dataset: str | None) -> dict[str, dict[str, Any]]:
    """`overrides` with curate's default `output.shards_uri` set to `uri` (a run's curate_overrides
    replace the whole default, so a run can still choose another or none)."""
    if uri is None:
        return overrides
    bucket = uri.removeprefix("s3://").split("/")[0]
    if not uri.startswith("s3://") or not bucket or "//" in uri.removeprefix("s3://"):
        raise InputError(f"--shards-uri {uri!r}", "is not an S3 location",
                         "s3://bucket/prefix, under which curate publishes each Dataset's shards")
    if from_dataset is not None:
        raise InputError(f"--shards-uri {uri!r}", "is given with --from-dataset, so no curate task publishes shards",
                         "one of the two")
    return {**overrides, "curate": {**overrides.get("curate", {}), "output.shards_uri": uri.rstrip("/")}}


_ARTIFACT_URI = re.compile(r"(?:s3|gs|minio)://[^/\s]+(?:/\S*)?")  # what a KFP cluster's importer reads


def _artifact_uri(uri: str, flag: str) -> str:
    """An artifact store URI, or an absolute local path (kfp.local runs import those)."""
    if not (_ARTIFACT_URI.fullmatch(uri) or (Path(uri).is_absolute() and uri.strip() == uri)):
        raise InputError(f"{flag} {uri!r}", "is not an artifact location",
                         "s3://, gs:// or minio://bucket/path of an existing artifact (or, for a local run, "
                         "an absolute directory)")
    return uri.rstrip("/")


def _imports(from_dataset: str | None, from_models: Sequence[str]) -> dict[str, str]:
    """stage → imported URI: `curate` for the Dataset, each `STAGE=URI` of --from-model (the stage
    names are checked against the pipeline's by gramline.kfp.pipeline)."""
    out = {"curate": _artifact_uri(from_dataset, "--from-dataset")} if from_dataset is not None else {}
    for item in from_models:
        stage, sep, uri = item.partition("=")
        if not sep or not stage or stage == "curate" or stage in out:
            raise InputError(f"--from-model {item!r}", "is malformed or repeats a stage",
                             "STAGE=URI, once per stage, STAGE a stage with a Model output (pretrain, anchor, ...)")
        out[stage] = _artifact_uri(uri, f"--from-model {stage}=")
    return out


def add_scheduling_options(parser: argparse.ArgumentParser, kubernetes: bool = True) -> None:
    """The compile options of `customize` (`kubernetes=False`: only those a local run uses)."""
    parser.add_argument("--train-gpus", type=int, default=None, metavar="N",
                        help="GPUs per training task (pretrain, gram, highres, distill, align), one process each "
                             "(default: the profile's)")
    if not kubernetes:
        return
    parser.add_argument("--gpu-product", default=None, metavar="PRODUCT",
                        help=f"node selector {GPU_PRODUCT_LABEL} of the training tasks (default: the profile's; "
                             "the other tasks take any GPU)")
    parser.add_argument("--partition-gpus", type=int, default=None, metavar="N",
                        help="GPUs per curate partition task (default: the profile's, none); with 1 or more the "
                             "partitions embed the images (curate embed.where=partitions) instead of the reduce")
    parser.add_argument("--memory", default=None, metavar="QUANTITY", help="memory of each training task, e.g. 900Gi")
    parser.add_argument("--ephemeral-storage", default=None, metavar="QUANTITY",
                        help=f"scratch disk of each training task: an emptyDir at {SCRATCH_MOUNT} (TMPDIR) "
                             "with this size limit")
    parser.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                        help="node selector of every task, repeatable")
    parser.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]",
                        help="toleration of every task, repeatable (GPU tasks always tolerate the nvidia.com/gpu taint)")
    parser.add_argument("--queue", default=None, metavar="NAME",
                        help=f"Kueue LocalQueue: pod label {QUEUE_LABEL}=NAME on every task")
    parser.add_argument("--image-pull-secret", action="append", default=[], metavar="NAME",
                        help="Secret with registry credentials for every task's image, repeatable")
    parser.add_argument("--nodes", type=int, default=1, metavar="N",
                        help="run each training task as a Kubeflow Trainer TrainJob on N nodes of --train-gpus "
                             "each (needs --pvc, a ReadWriteMany claim; docs/multinode.md)")
    parser.add_argument("--node-service-account", default=None, metavar="NAME",
                        help="ServiceAccount of the TrainJob pods with --nodes (IRSA: gramline-runner)")
    parser.add_argument("--shards-uri", default=None, metavar="S3_URI",
                        help="s3://bucket/prefix where curate publishes the shards (its default output.shards_uri): "
                             "the Dataset artifact then holds the index and manifest only and the training pods "
                             "stream the shards; recommended with the GPU profiles")
    parser.add_argument("--from-dataset", default=None, metavar="URI",
                        help="import this Dataset artifact instead of running curate (dsl.importer)")
    parser.add_argument("--from-model", action="append", default=[], metavar="STAGE=URI",
                        help="import this Model as STAGE's output instead of running it; stages that only fed "
                             "it are left out too (repeatable)")


def scheduled_profile(args: argparse.Namespace, pvc: str | None = None) -> DeploymentProfile:
    """The profile `args.profile` with the options of `add_scheduling_options` applied."""
    profile = deployment_profile(args.profile, pvc, flag=args.profile_flag, state_root=getattr(args, "state_root", None))
    return customize(profile, train_gpus=args.train_gpus, gpu_product=getattr(args, "gpu_product", None),
                     memory=getattr(args, "memory", None), ephemeral_storage=getattr(args, "ephemeral_storage", None),
                     node_selector=getattr(args, "node_selector", ()), tolerations=getattr(args, "toleration", ()),
                     queue=getattr(args, "queue", None), image_pull_secrets=getattr(args, "image_pull_secret", ()),
                     nodes=getattr(args, "nodes", 1), node_service_account=getattr(args, "node_service_account", None),
                     shards_uri=getattr(args, "shards_uri", None), from_dataset=getattr(args, "from_dataset", None),
                     from_models=getattr(args, "from_model", ()), partition_gpus=getattr(args, "partition_gpus", None))


# --------------------------------------------------------------------------- runtime preset vs compiled GPUs


def preset_gpus_warning(preset: str, gpus: int) -> str | None:
    """Why the recipe preset `preset` does not fit a training task compiled with `gpus` GPUs, or None.

    A deployment profile names the preset its training tasks are sized for; run under another GPU
    count, that preset's recipe trains with another global batch (its per-process `train.batch_size`
    times the processes) and the learning rate scaled from it. The stages warn rather than refuse: a
    smoke test such as `preset=tiny` on a GPU profile is a deliberate choice.
    """
    sized = [p for p in PROFILES.values() if p.preset == preset]
    if not sized:
        return None
    expected = sized[0].task(TRAINING_STAGES[0]).gpus
    if expected == gpus:
        return None
    return (f"the `preset` parameter {preset!r} is sized for {expected or 'no'} GPU(s) per training task (deployment "
            f"profile {sized[0].name!r}) but this task was compiled with {gpus or 'no'} GPU(s): the recipe's global "
            f"batch (train.batch_size per process x processes) and the learning rate scaled from it differ from "
            f"that profile's; compile with --profile {sized[0].name} or --train-gpus {expected} to match")


# --------------------------------------------------------------------------- images


def content_hash(repo: Path = REPO) -> str:
    """sha256 (16 hex digits) over what goes into an image: the package sources, pyproject.toml, the
    lock file (constraints.txt) and the Dockerfiles. Outside a checkout: the package sources alone."""
    digest = hashlib.sha256()
    files = sorted(p for p in (repo / "gramline").rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    files += [repo / name for name in IMAGE_INPUTS if (repo / name).is_file()]
    for path in files:
        digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def image_reference(variant: str, registry: str | None = None, repo: Path = REPO) -> str:
    """`[REGISTRY/]gramline[-cuda]:<version>-<content hash>`: the tag images/build.py builds and the
    pipeline names by default, so an image rebuilt from changed content gets a new tag (and KFP's
    cache key, which includes the image, changes with it)."""
    from gramline import __version__

    if variant not in IMAGE_NAMES:
        raise ValueError(f"image variant {variant!r}: expected one of {', '.join(IMAGE_NAMES)}")
    name = f"{IMAGE_NAMES[variant]}:{__version__}-{content_hash(repo)}"
    return f"{registry.rstrip('/')}/{name}" if registry else name
