"""The gramline DAG as a KFP pipeline, built from a table of stages and their edges.

    curate ─► pretrain ─► anchor ─► gram ─► highres ─► distill ─► align ─► benchmark
       │          └──────────────────┘                                        ▲
       └── dataset to every stage; every Model (each student, the aligned) ───┘ (+ random-init, optional timm, start)

Adding a stage = its component in `components.py` + one `Stage` row here (its edges). A stage whose
module is not in this build (`gramline.stages.<name>`), or whose upstream is missing, is left out.
A stage the profile imports (`--from-dataset`, `--from-model STAGE=URI`) is a `dsl.importer` of its
output instead, and the stages that only fed it are left out (`left_out`).

Pipeline parameters: `source` (curate --source), `preset` (SSL preset of the training stages and
benchmark), `curate_preset`, `init_from` (pretrain --init-from: timm:<name>[@file], a Model directory
or an official checkpoint file; empty = from scratch; the benchmark then also compares the starting
model as `start`, its Gram reference) and `<stage>_overrides` (a dict of dotted config keys) per
stage. Their defaults (init_from: empty) and every task's Kubernetes settings come from a deployment
profile (profiles.py).
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes
from kfp.dsl import Artifact

from gramline.errors import InputError
from gramline.io import atomic_path
from gramline.kfp.components import DEFAULT_IMAGE, benchmark_component, build_components
from gramline.kfp.profiles import (
    DEFAULT_PROFILE,
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    GPU_TAINT,
    QUEUE_LABEL,
    S3_SECRET_KEYS,
    SCRATCH_MOUNT,
    DeploymentProfile,
    TaskSettings,
    deployment_profile,
    image_reference,
)
from gramline.stages import TRAINING_STAGES

PIPELINE_NAME = "gramline"


@dataclass(frozen=True)
class Stage:
    name: str
    artifacts: dict[str, str] = field(default_factory=dict)  # component input → "<stage>.<output>"
    parameters: dict[str, str] = field(default_factory=dict)  # component input → pipeline parameter
    preset_parameter: str = "preset"
    produces_model: bool = False  # its `model` output is benchmarked


STAGES: tuple[Stage, ...] = (
    Stage("curate", parameters={"source": "source"}, preset_parameter="curate_preset"),
    Stage("pretrain", {"dataset": "curate.dataset"}, parameters={"init_from": "init_from"}, produces_model=True),
    Stage("anchor", {"pretrained": "pretrain.model", "dataset": "curate.dataset"}, produces_model=True),
    Stage("gram", {"pretrained": "pretrain.model", "anchor": "anchor.model", "dataset": "curate.dataset"},
          produces_model=True),
    Stage("highres", {"anchored": "gram.model", "dataset": "curate.dataset"}, produces_model=True),
    Stage("distill", {"teacher": "highres.model", "dataset": "curate.dataset"}, produces_model=True),
    # the distill output stands for its largest student (the stage's align.student picks another)
    Stage("align", {"backbone": "distill.model", "dataset": "curate.dataset"}, produces_model=True),
)
# the benchmark also compares the weights pretrain started from (`start`, the Gram reference) when init_from is set
BENCHMARK = Stage("benchmark", {"eval_dataset": "curate.dataset"}, parameters={"start_model": "init_from"})


def stage_available(name: str) -> bool:
    return importlib.util.find_spec(f"gramline.stages.{name}") is not None


def active_stages(available: Callable[[str], bool] = stage_available) -> list[Stage]:
    """The table's stages present in this build whose upstream stages are all present too."""
    chosen: list[Stage] = []
    for stage in STAGES:
        upstream = {ref.split(".")[0] for ref in stage.artifacts.values()}
        if available(stage.name) and upstream <= {s.name for s in chosen}:
            chosen.append(stage)
    return chosen


def apply_task_settings(task: Any, settings: TaskSettings, profile: DeploymentProfile) -> None:
    """Resources, volumes, secrets, scheduling, security context, retries, timeout and caching of one task."""
    if settings.cpu:
        task.set_cpu_request(settings.cpu).set_cpu_limit(settings.cpu)
    if settings.memory:
        task.set_memory_request(settings.memory).set_memory_limit(settings.memory)
    if settings.gpus:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(settings.gpus)
        if settings.gpu_product:
            kubernetes.add_node_selector(task, GPU_PRODUCT_LABEL, settings.gpu_product)
        kubernetes.add_toleration(task, **GPU_TAINT)
    for toleration in profile.tolerations:
        kubernetes.add_toleration(task, **toleration)
    for key, value in profile.node_selector.items():
        kubernetes.add_node_selector(task, key, value)
    if profile.queue:
        kubernetes.add_pod_label(task, QUEUE_LABEL, profile.queue)
    if profile.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(profile.image_pull_secrets))
    if profile.run_as_user is not None:
        kubernetes.set_security_context(task, run_as_user=profile.run_as_user, run_as_group=profile.run_as_user,
                                        run_as_non_root=True)
    if settings.ephemeral_storage:
        # KFP 2.17 sets no ephemeral-storage request; a disk-backed emptyDir bounds the scratch space
        kubernetes.empty_dir_mount(task, volume_name="scratch", mount_path=SCRATCH_MOUNT,
                                   size_limit=settings.ephemeral_storage)
        task.set_env_variable("TMPDIR", SCRATCH_MOUNT)
    if settings.shm:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=settings.shm)
    if profile.s3_secret:
        kubernetes.use_secret_as_env(task, profile.s3_secret, {key: key for key in S3_SECRET_KEYS}, optional=True)
    if profile.pvc:
        kubernetes.mount_pvc(task, pvc_name=profile.pvc, mount_path=profile.pvc_mount)
    if settings.timeout_s:
        kubernetes.set_timeout(task, settings.timeout_s)
    if settings.retries:
        task.set_retry(settings.retries, backoff_duration=settings.backoff, backoff_factor=settings.backoff_factor,
                       backoff_max_duration=settings.retry_window())
    task.set_caching_options(enable_caching=settings.cache)


def _parameters(profile: DeploymentProfile, stages: list[Stage]) -> list[inspect.Parameter]:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("source", kind, default=profile.source, annotation=str),
              inspect.Parameter("preset", kind, default=profile.preset, annotation=str),
              inspect.Parameter("curate_preset", kind, default=profile.curate_preset, annotation=str),
              inspect.Parameter("init_from", kind, default="", annotation=str)]
    for stage in stages:
        params.append(inspect.Parameter(f"{stage.name}_overrides", kind,
                                        default=dict(profile.overrides.get(stage.name, {})), annotation=dict))
    return params


def default_image(profile: DeploymentProfile, registry: str | None = None) -> str:
    """The image `profile`'s tasks run unless told otherwise: its variant, tagged by content."""
    return image_reference(profile.image_variant, registry)


def curate_fan_out(component: Any, profile: DeploymentProfile) -> Any:
    """The sub-pipeline that runs `curate_partition` once per partition of the plan (dsl.ParallelFor)
    and returns their outputs as one list (dsl.Collected) for the curate reduce.

    A nested pipeline because kfp.local (2.17.3, orchestrator/enhanced_dag_orchestrator.py) takes a
    ParallelFor's items only from an input of the enclosing pipeline or from a task output named
    `Output`, a name a container component cannot give an output; the cluster runs either form."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    inputs = {"source": str, "partitions": list, "preset": str, "overrides": dict}

    def curate_partitions(source: str, partitions: list, preset: str, overrides: dict) -> Any:
        with dsl.ParallelFor(partitions, parallelism=profile.partition_parallelism) as partition:
            task = component(source=source, partition=partition, preset=preset, overrides=overrides)
            task.set_display_name("curate-partition")
            apply_task_settings(task, profile.task("curate_partition"), profile)
        return dsl.Collected(task.outputs["part"])

    curate_partitions.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(name, kind, annotation=t) for name, t in inputs.items()],
        return_annotation=list[Artifact])
    curate_partitions.__annotations__ = {**inputs, "return": list[Artifact]}
    return dsl.pipeline(name="curate-partitions")(curate_partitions)


def multinode_components(profile: DeploymentProfile, image: str) -> dict[str, Any]:
    """Each training stage as a launcher of a Kubeflow Trainer TrainJob on `profile.nodes` nodes
    (gramline.kfp.multinode; docs/multinode.md): inputs, checkpoints and Models on the shared claim."""
    from gramline.kfp.multinode import multinode_component

    if not profile.pvc:
        raise InputError(f"--nodes {profile.nodes}", "is given without --pvc",
                         "a ReadWriteMany claim the nodes share (--pvc CLAIM)")
    out = {}
    for stage in TRAINING_STAGES:
        s = profile.task(stage)
        out[stage] = multinode_component(
            stage, image, profile.nodes, s.gpus, s.cpu, s.memory, f"{profile.pvc_mount}/gramline-trainjobs",
            pvc=profile.pvc, pvc_mount=profile.pvc_mount, state_root=profile.state_root, s3_secret=profile.s3_secret,
            shm=s.shm, run_as_user=profile.run_as_user, timeout_s=s.timeout_s,
            service_account=profile.node_service_account)
    return out


def left_out(stages: list[Stage], imports: dict[str, str]) -> set[str]:
    """The stages an import makes unnecessary: not imported themselves, and every stage that takes
    their output is imported or left out too (curate never: the Dataset feeds every stage). E.g.
    `--from-model highres=URI` leaves out pretrain, anchor and gram; `--from-model anchor=URI` none."""
    known = {"curate", *(s.name for s in stages if s.produces_model)}
    for name, uri in imports.items():
        if name not in known:
            raise InputError(f"--from-model {name}={uri}", f"names {name!r}, which has no Model output in this pipeline",
                             "one of " + ", ".join(sorted(known - {"curate"})))
    dropped: set[str] = set()
    for stage in reversed(stages[1:]):
        takers = [s.name for s in stages if any(ref.split(".")[0] == stage.name for ref in s.artifacts.values())]
        if stage.name not in imports and takers and all(t in imports or t in dropped for t in takers):
            dropped.add(stage.name)
    return dropped


def build_pipeline(profile: DeploymentProfile, image: str | None = None,
                   available: Callable[[str], bool] = stage_available) -> Any:
    """The `@dsl.pipeline` for `profile`, every task running `image` (default: `default_image`)."""
    stages = active_stages(available)
    if not stages or stages[0].name != "curate" or not available(BENCHMARK.name):
        raise RuntimeError("this gramline build lacks the curate or benchmark stage")
    image = image or default_image(profile)
    components = build_components(image, {stage: profile.task(stage).gpus for stage in TRAINING_STAGES},
                                  profile.state_root)
    if profile.nodes > 1:
        components.update(multinode_components(profile, image))
    imports = profile.imports
    stages = [s for s in stages if s.name not in left_out(stages, imports)]
    models = [s.name for s in stages if s.produces_model]  # an imported Model is benchmarked under its stage's name
    benchmark = benchmark_component(models, image, profile.timm_baseline)
    params = _parameters(profile, [*(s for s in stages if s.name not in imports), BENCHMARK])
    names = [p.name for p in params]
    if "curate" not in imports:
        partitions_pipeline = curate_fan_out(components["curate_partition"], profile)  # not inside another pipeline

    def gramline(*values: Any) -> None:
        args = dict(zip(names, values))
        tasks: dict[str, Any] = {}

        def output(ref: str) -> Any:
            name, out = ref.split(".")
            return tasks[name].output if name in imports else tasks[name].outputs[out]

        def run(stage: Stage, component: Any, extra: dict[str, Any]) -> Any:
            inputs = {key: output(ref) for key, ref in stage.artifacts.items()}
            inputs.update({key: args[param] for key, param in stage.parameters.items()})
            task = component(**inputs, **extra, preset=args[stage.preset_parameter],
                             overrides=args[f"{stage.name}_overrides"])
            task.set_display_name(stage.name)
            settings = profile.task(stage.name)
            if profile.nodes > 1 and stage.name in TRAINING_STAGES:  # the launcher: the TrainJob's nodes train
                settings = replace(settings, gpus=0, cpu="1", memory="2Gi", shm=None, ephemeral_storage=None)
            apply_task_settings(task, settings, profile)
            tasks[stage.name] = task
            return task

        def curate_partitions() -> Any:
            """curate-plan, then one curate-partition per partition: the reduce's `parts`."""
            common = {"source": args["source"], "preset": args["curate_preset"], "overrides": args["curate_overrides"]}
            plan = components["curate_plan"](**common)
            plan.set_display_name("curate-plan")
            apply_task_settings(plan, profile.task("curate_plan"), profile)
            fan_out = partitions_pipeline(**common, partitions=plan.outputs["partitions"])
            fan_out.set_display_name("curate-partitions")
            return fan_out.output

        for stage in stages:
            if stage.name in imports:  # the artifact at that URI stands for the stage's output
                kind = dsl.Dataset if stage.name == "curate" else dsl.Model
                tasks[stage.name] = dsl.importer(artifact_uri=imports[stage.name], artifact_class=kind)
                tasks[stage.name].set_display_name(f"{stage.name}-import")
                continue
            extra = {"parts": curate_partitions()} if stage.name == "curate" else {}
            if (profile.state_root or profile.nodes > 1) and stage.name in TRAINING_STAGES:  # the driver resolves it: the run's id
                extra["run_id"] = dsl.PIPELINE_JOB_ID_PLACEHOLDER
            run(stage, components[stage.name], extra)
        run(BENCHMARK, benchmark, {name: output(f"{name}.model") for name in models})

    gramline.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    gramline.__annotations__ = {p.name: p.annotation for p in params}
    gramline.__doc__ = (f"gramline: the DINOv3 recipe as a DAG ({' -> '.join(s.name for s in stages)} -> benchmark); "
                        f"compiled with deployment profile {profile.name!r}: {profile.description}."
                        + "".join(f" {name}: imported from {uri}." for name, uri in imports.items()))
    return dsl.pipeline(name=PIPELINE_NAME)(gramline)


def compile_components(directory: Path | str, image: str = DEFAULT_IMAGE,
                       available: Callable[[str], bool] = stage_available) -> list[Path]:
    """Write one reusable component YAML per stage (`<directory>/<stage>.yaml`) and return the paths."""
    stages = active_stages(available)
    components = build_components(image)
    chosen = {s.name: components[s.name] for s in stages}
    if "curate" in chosen:  # the reduce consumes the partitions the plan and the partition tasks make
        chosen = {"curate_plan": components["curate_plan"], "curate_partition": components["curate_partition"],
                  **chosen}
    chosen[BENCHMARK.name] = benchmark_component([s.name for s in stages if s.produces_model], image)
    written = []
    for name, component in chosen.items():
        path = Path(directory) / f"{name}.yaml"
        with atomic_path(path) as tmp:
            staged = tmp.with_suffix(".yaml")
            try:
                compiler.Compiler().compile(component, str(staged))
                staged.rename(tmp)
            finally:
                staged.unlink(missing_ok=True)
        written.append(path)
    return written


def compile_pipeline(output: Path | str, profile: str | DeploymentProfile = DEFAULT_PROFILE, image: str | None = None,
                     pvc: str | None = None) -> Path:
    """Compile the pipeline of deployment profile `profile` (a name, or a profile `customize`d) to
    `output` (written atomically); its path. `image` None: the profile's `default_image`."""
    if isinstance(profile, str):
        profile = deployment_profile(profile, pvc)
    elif pvc:
        profile = replace(profile, pvc=pvc)
    pipeline = build_pipeline(profile, image)
    output = Path(output)
    with atomic_path(output) as tmp:
        staged = tmp.with_suffix(".yaml")  # the compiler insists on a .yaml name
        try:
            compiler.Compiler().compile(pipeline, str(staged))
            staged.rename(tmp)
        finally:
            staged.unlink(missing_ok=True)
    return output
