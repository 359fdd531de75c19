"""The gramline DAG as a KFP pipeline, built from a table of stages and their edges.

    curate ─► pretrain ─► anchor ─► gram ─► highres ─► distill ─► align ─► benchmark
       │          └──────────────────┘                                        ▲
       └── dataset to every stage; every Model (each student, the aligned) ───┘ (+ random-init, optional timm, start)

Adding a stage = its component in `components.py` + one `Stage` row here (its edges). A stage whose
module is not in this build (`gramline.stages.<name>`), or whose upstream is missing, is left out.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes

from gramline.io import atomic_path
from gramline.kfp.components import DEFAULT_IMAGE, benchmark_component, build_components
from gramline.kfp.profiles import (
    DEFAULT_PROFILE,
    GPU_RESOURCE,
    S3_SECRET_KEYS,
    DeploymentProfile,
    TaskSettings,
    deployment_profile,
)

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
    """Resources, volumes, secrets, scheduling, retries, timeout and caching of one task."""
    if settings.cpu:
        task.set_cpu_request(settings.cpu).set_cpu_limit(settings.cpu)
    if settings.memory:
        task.set_memory_request(settings.memory).set_memory_limit(settings.memory)
    if settings.gpus:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(settings.gpus)
        if settings.gpu_product:
            kubernetes.add_node_selector(task, "nvidia.com/gpu.product", settings.gpu_product)
        for toleration in profile.tolerations:
            kubernetes.add_toleration(task, **toleration)
    for key, value in profile.node_selector.items():
        kubernetes.add_node_selector(task, key, value)
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
                       backoff_max_duration=settings.backoff_max)
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


def build_pipeline(profile: DeploymentProfile, image: str = DEFAULT_IMAGE,
                   available: Callable[[str], bool] = stage_available) -> Any:
    """The `@dsl.pipeline` for `profile`, every task running `image`."""
    stages = active_stages(available)
    if not stages or stages[0].name != "curate" or not available(BENCHMARK.name):
        raise RuntimeError("this gramline build lacks the curate or benchmark stage")
    components = build_components(image)
    models = [s.name for s in stages if s.produces_model]
    benchmark = benchmark_component(models, image, profile.timm_baseline)
    params = _parameters(profile, [*stages, BENCHMARK])
    names = [p.name for p in params]

    def gramline(*values: Any) -> None:
        args = dict(zip(names, values))
        tasks: dict[str, Any] = {}

        def run(stage: Stage, component: Any, extra: dict[str, Any]) -> Any:
            inputs = {key: tasks[ref.split(".")[0]].outputs[ref.split(".")[1]] for key, ref in stage.artifacts.items()}
            inputs.update({key: args[param] for key, param in stage.parameters.items()})
            task = component(**inputs, **extra, preset=args[stage.preset_parameter],
                             overrides=args[f"{stage.name}_overrides"])
            task.set_display_name(stage.name)
            apply_task_settings(task, profile.task(stage.name), profile)
            tasks[stage.name] = task
            return task

        for stage in stages:
            run(stage, components[stage.name], {})
        run(BENCHMARK, benchmark, {name: tasks[name].outputs["model"] for name in models})

    gramline.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    gramline.__annotations__ = {p.name: p.annotation for p in params}
    gramline.__doc__ = (f"gramline: the DINOv3 recipe as a DAG ({' -> '.join(s.name for s in stages)} -> benchmark); "
                        f"compiled with deployment profile {profile.name!r}: {profile.description}.")
    return dsl.pipeline(name=PIPELINE_NAME)(gramline)


def compile_components(directory: Path | str, image: str = DEFAULT_IMAGE,
                       available: Callable[[str], bool] = stage_available) -> list[Path]:
    """Write one reusable component YAML per stage (`<directory>/<stage>.yaml`) and return the paths."""
    stages = active_stages(available)
    components = build_components(image)
    chosen = {s.name: components[s.name] for s in stages}
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


def compile_pipeline(output: Path | str, profile: str = DEFAULT_PROFILE, image: str = DEFAULT_IMAGE,
                     pvc: str | None = None) -> Path:
    """Compile the pipeline of deployment profile `profile` to `output` (written atomically); its path."""
    pipeline = build_pipeline(deployment_profile(profile, pvc), image)
    output = Path(output)
    with atomic_path(output) as tmp:
        staged = tmp.with_suffix(".yaml")  # the compiler insists on a .yaml name
        try:
            compiler.Compiler().compile(pipeline, str(staged))
            staged.rename(tmp)
        finally:
            staged.unlink(missing_ok=True)
    return output
