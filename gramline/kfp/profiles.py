"""Deployment profiles: the compiled pipeline's parameter defaults and each task's Kubernetes settings.

A deployment profile is chosen at compile time (`pipeline/compile.py --profile P`, `gramline run
--profile P`; both also take the older name `--preset`). It sets the defaults of the pipeline
parameters (source, the stages' recipe presets and overrides), which a run can still change
(`kfp run submit ... preset=tiny pretrain_overrides='{"train.steps": 50}'`), and the per-task
settings that KFP fixes at compile time: GPU type and count, CPU/memory, the `/dev/shm` emptyDir,
S3 credentials from a Secret, an optional PVC, node selector, tolerations, retries with backoff,
timeouts and caching. The stages' recipe presets (gramline/presets.py) are another thing: a
profile names one as the default of the `preset` parameter.

Caching: training stages (pretrain, gram, highres, distill, align) never come from the cache, nor does curate (its
source URI can name a bucket whose content changed). anchor and benchmark are pure functions of
their input artifacts and parameters, so KFP's cache key (which includes them) is safe.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from typing import Any

from gramline.errors import InputError

# Keys of the Secret made by manifests/ (base/s3-secret.yaml); boto3 reads them from the env.
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class TaskSettings:
    """Kubernetes settings of one task. Sizes are Kubernetes quantities ("8", "64Gi")."""

    cpu: str | None = None
    memory: str | None = None  # also covers the memory-backed /dev/shm
    gpus: int = 0
    gpu_product: str | None = None  # node selector nvidia.com/gpu.product
    shm: str | None = None  # /dev/shm emptyDir (medium Memory) size
    timeout_s: int = 0  # pod activeDeadlineSeconds; 0 = none
    retries: int = 0
    backoff: str = "60s"
    backoff_factor: float = 2.0
    backoff_max: str = "3600s"
    cache: bool = False


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
    node_selector: dict[str, str] = field(default_factory=dict)  # every task
    tolerations: list[dict[str, Any]] = field(default_factory=list)  # GPU tasks
    timm_baseline: str | None = None  # benchmark also compares timm:<name> (public weights, downloaded by timm)

    def task(self, stage: str) -> TaskSettings:
        return self.tasks.get(stage, TaskSettings())


_GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
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
        "curate": {"split.eval_fraction": 0.3},  # ~100 eval images: probes above a handful of samples
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
           for stage in ("curate", "pretrain", "anchor", "gram", "highres", "distill", "align", "benchmark")},
    s3_secret=None,  # no retries either: a failing local stage should stop the run at once
)


def _gpu_profile(name: str, description: str, gpus: int, product: str, memory: str, shm: str,
                 train_days: int, timm_baseline: str) -> DeploymentProfile:
    train = TaskSettings(cpu=str(12 * gpus), memory=memory, gpus=gpus, gpu_product=product, shm=shm,
                         timeout_s=train_days * _DAY, retries=2, backoff="120s", backoff_max="1800s")
    return DeploymentProfile(
        name=name,
        description=description,
        source="synthetic:n=20000,size=224,seed=0",
        preset=name,
        curate_preset="large",
        overrides={stage: {} for stage in ("curate", "pretrain", "anchor", "gram", "highres", "distill",
                                           "align", "benchmark")},
        tasks={
            "curate": TaskSettings(cpu="16", memory="64Gi", gpus=1, gpu_product=product, shm="16Gi",
                                   timeout_s=2 * _DAY, retries=2),
            "pretrain": train,
            "anchor": TaskSettings(cpu="8", memory="64Gi", gpus=1, gpu_product=product, shm="8Gi",
                                   timeout_s=6 * 3600, retries=2, cache=True),
            "gram": train,
            "highres": train,
            "distill": train,
            "align": train,
            "benchmark": TaskSettings(cpu="8", memory="64Gi", gpus=1, gpu_product=product, shm="8Gi",
                                      timeout_s=_DAY, retries=2, cache=True),
        },
        tolerations=[dict(_GPU_TOLERATION)],
        timm_baseline=timm_baseline,
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


def deployment_profile(name: str, pvc: str | None = None, flag: str = PROFILE_FLAG) -> DeploymentProfile:
    """The profile `name`, with the claim `pvc` mounted in every task when given; errors name `flag`."""
    if name not in PROFILES:
        kind = "pipeline preset" if flag == OLD_PROFILE_FLAG else "deployment profile"  # the older flag's words
        raise InputError(flag, f"{name!r} is not a {kind}", "one of " + ", ".join(PROFILES))
    profile = PROFILES[name]
    return replace(profile, pvc=pvc) if pvc else profile


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
