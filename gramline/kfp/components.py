"""One KFP container component per stage (container components:
https://www.kubeflow.org/docs/components/pipelines/user-guides/components/container-components/).

Every component runs `python -m gramline.stages.<stage>` in the gramline image, passes artifact
`.path`s as the stage's directory flags, `{{$.outputs.output_file}}` as `--executor-output` and each
output's `.uri` as `--output-uri NAME=URI`. A container component gets none of the bookkeeping a
Python component's executor does, so the stage does it: it creates its output directories (nothing
creates the parent of an output `.path`) and writes the whole executor output file, naming every
output artifact with its URI and metadata (KFP reads output metadata from that file, and kfp.local
takes a task's output artifacts from it alone). Parameters common to every stage: `preset` (the
stage's named preset) and `overrides` (a dict of dotted config keys, passed as `--overrides JSON`).
The training components have a second output, `mlpipeline_ui_metadata`: the file behind the KFP UI's
"Start Tensorboard" button for the Model's event files (`training_args`).

The image and the training stages' GPU counts are fixed when the components are built
(`build_components(image, gpus)`), so a compiled pipeline names exactly one image, and a training
task with N > 1 GPUs runs `python -m torch.distributed.run --standalone --nproc-per-node N -m
gramline.stages.<stage>` (torchrun's module, https://docs.pytorch.org/docs/stable/elastic/run.html:
one process per GPU of the pod, each on its own device), with `--gpus N` so that the stage can
check the runtime `preset` against it. The module rather than the `torchrun` script: the script's
interpreter is whichever Python installed torch (a base image's), while the workers must run the
Python gramline is installed in. The command says `python`, never `python3`: kfp.local's process
runner rewrites every `python3` substring.
"""

# no `from __future__ import annotations`: KFP reads the real annotation objects

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from gramline import __version__
from gramline.errors import InputError
from gramline.stages.common import UI_METADATA

DEFAULT_IMAGE = f"gramline:{__version__}"
EXECUTOR_OUTPUT = dsl.PIPELINE_TASK_EXECUTOR_OUTPUT_PATH_PLACEHOLDER

# Docker's image reference grammar (github.com/distribution/reference): [host[:port]/]path[:tag][@digest]
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
IMAGE_REFERENCE = re.compile(
    rf"(?:{_HOST}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[\w][\w.-]{{0,127}})?(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{{32,}})?")


def check_image(image: str, flag: str = "--image") -> str:
    """`image` if it is a valid Docker image reference, else an InputError naming it."""
    if len(image) > 255 or not IMAGE_REFERENCE.fullmatch(image):
        raise InputError(f"{flag} {image!r}", "is not a valid image reference",
                         "[registry[:port]/]name[:tag][@sha256:digest] in lower case, e.g. ghcr.io/org/gramline:0.1.0")
    return image


def stage_command(stage: str, gpus: int = 0) -> list[str]:
    """The stage's module; under torchrun, one process per GPU, when it has more than one."""
    module = ["-m", f"gramline.stages.{stage}"]
    if gpus > 1:
        return ["python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus), *module]
    return ["python", *module]


def common_args(preset: Any, overrides: Any, outputs: dict[str, Any]) -> list[Any]:
    """Flags every stage takes (gramline.stages.common), with the KFP URI of each output."""
    args: list[Any] = ["--preset", preset, "--overrides", overrides, "--executor-output", EXECUTOR_OUTPUT]
    for name, artifact in outputs.items():
        args += ["--output-uri", dsl.ConcatPlaceholder([f"{name}=", artifact.uri])]
    return args


def training_args(preset: Any, overrides: Any, model: Any, ui_metadata: Any) -> list[Any]:
    """A training stage's outputs and common flags: its Model and the KFP UI's visualization file,
    the output named `mlpipeline_ui_metadata` (gramline.stages.common.emit_training_output)."""
    return ["--out-model", model.path, "--out-ui-metadata", ui_metadata.path,
            *common_args(preset, overrides, {"model": model, UI_METADATA: ui_metadata})]


def state_args(state_root: str | None, run_id: Any, stage: str) -> list[Any]:
    """`--state-uri <state_root>/<run id>/<stage>` of a training stage (gramline.train.state_sync), or
    nothing without a root. `run_id` is the component input that the pipeline sets to
    dsl.PIPELINE_JOB_ID_PLACEHOLDER: the KFP driver resolves that placeholder as a whole input value
    (and kfp.local as well), so the URI is joined here."""
    if not state_root:
        return []
    return ["--state-uri", dsl.ConcatPlaceholder([f"{state_root.rstrip('/')}/", run_id, f"/{stage}"])]


def build_components(image: str = DEFAULT_IMAGE, gpus: Mapping[str, int] | None = None,
                     state_root: str | None = None) -> dict[str, Callable[..., Any]]:
    """The training-line components for `image`, by stage name (benchmark: `benchmark_component`).

    `gpus`: the GPUs of each training stage's task (a deployment profile's); without it the
    components are the reusable single-process ones (components/*.yaml). `state_root`: where the
    training stages keep their state per run (`state_args`); their `run_id` input is then the run's id."""
    check_image(image)

    def training(stage: str) -> tuple[list[str], list[str]]:
        """The stage's command and the `--gpus` flag it takes when built for a profile's tasks."""
        if gpus is None:
            return stage_command(stage), []
        return stage_command(stage, gpus.get(stage, 0)), ["--gpus", str(gpus.get(stage, 0))]

    @dsl.container_component
    def curate_plan(source: str, preset: str, overrides: dict, partitions: dsl.OutputPath(list)):
        """Count the source's items and cut them into partitions (the curate fan-out)."""
        return dsl.ContainerSpec(
            image=image, command=stage_command("curate_plan"),
            args=["--source", source, *common_args(preset, overrides, {})])

    @dsl.container_component
    def curate_partition(source: str, partition: dict, preset: str, overrides: dict, part: Output[Artifact]):
        """Ingest and validate one partition: its chunks, copy descriptors and colour layouts."""
        return dsl.ContainerSpec(
            image=image, command=stage_command("curate_partition"),
            args=["--source", source, "--partition", partition, "--out-part", part.path,
                  *common_args(preset, overrides, {"part": part})])

    @dsl.container_component
    def curate(source: str, parts: Input[list[Artifact]], preset: str, overrides: dict, dataset: Output[Dataset]):
        """Deduplicate, split, balance and shard the collected partitions into a Dataset (train + eval).
        A container command has no placeholder for a list input's paths: the stage reads them from
        the executor input (the executor-input placeholder)."""
        return dsl.ContainerSpec(
            image=image, command=stage_command("curate"),
            args=["--source", source, "--out-dataset", dataset.path,
                  "--executor-input", dsl.PIPELINE_TASK_EXECUTOR_INPUT_PLACEHOLDER,
                  *common_args(preset, overrides, {"dataset": dataset})])

    @dsl.container_component
    def pretrain(dataset: Input[Dataset], preset: str, overrides: dict, model: Output[Model],
                 mlpipeline_ui_metadata: Output[Artifact], init_from: str = "", run_id: str = ""):
        """DINOv3 SSL pretraining (DINO + iBOT + KoLeo) on the Dataset's train shards; from `init_from`
        (timm:<name>[@file], a Model directory or an official checkpoint file) when given, else from scratch."""
        return dsl.ContainerSpec(
            image=image, command=training("pretrain")[0],
            args=[*training("pretrain")[1], "--dataset", dataset.path, "--init-from", init_from,
                  *training_args(preset, overrides, model, mlpipeline_ui_metadata),
                  *state_args(state_root, run_id, "pretrain")])

    @dsl.container_component
    def anchor(pretrained: Input[Model], dataset: Input[Dataset], preset: str, overrides: dict,
               model: Output[Model]):
        """Pick the frozen Gram teacher among the pretrain run's teacher checkpoints."""
        return dsl.ContainerSpec(
            image=image, command=stage_command("anchor"),
            args=["--model", pretrained.path, "--dataset", dataset.path, "--out-model", model.path,
                  *common_args(preset, overrides, {"model": model})])

    @dsl.container_component
    def gram(pretrained: Input[Model], anchor: Input[Model], dataset: Input[Dataset], preset: str,
             overrides: dict, model: Output[Model], mlpipeline_ui_metadata: Output[Artifact], run_id: str = ""):
        """Continue the pretrain run with Gram anchoring against the anchor's backbone."""
        return dsl.ContainerSpec(
            image=image, command=training("gram")[0],
            args=[*training("gram")[1], "--model", pretrained.path, "--anchor", anchor.path, "--dataset", dataset.path,
                  *training_args(preset, overrides, model, mlpipeline_ui_metadata),
                  *state_args(state_root, run_id, "gram")])

    @dsl.container_component
    def highres(anchored: Input[Model], dataset: Input[Dataset], preset: str, overrides: dict,
                model: Output[Model], mlpipeline_ui_metadata: Output[Artifact], run_id: str = ""):
        """Mixed-resolution adaptation with a fixed Gram teacher at 1.5x resolution."""
        return dsl.ContainerSpec(
            image=image, command=training("highres")[0],
            args=[*training("highres")[1], "--model", anchored.path, "--dataset", dataset.path,
                  *training_args(preset, overrides, model, mlpipeline_ui_metadata),
                  *state_args(state_root, run_id, "highres")])

    @dsl.container_component
    def distill(teacher: Input[Model], dataset: Input[Dataset], preset: str, overrides: dict, model: Output[Model],
                mlpipeline_ui_metadata: Output[Artifact], run_id: str = ""):
        """Distil the preset's students from the frozen teacher, sharing every teacher forward."""
        return dsl.ContainerSpec(
            image=image, command=training("distill")[0],
            args=[*training("distill")[1], "--teacher", teacher.path, "--dataset", dataset.path,
                  *training_args(preset, overrides, model, mlpipeline_ui_metadata),
                  *state_args(state_root, run_id, "distill")])

    @dsl.container_component
    def align(backbone: Input[Model], dataset: Input[Dataset], preset: str, overrides: dict, model: Output[Model],
              mlpipeline_ui_metadata: Output[Artifact], run_id: str = ""):
        """Align a text tower to the frozen backbone (LiT / dino.txt): a captioned dataset, contrastive loss."""
        return dsl.ContainerSpec(
            image=image, command=training("align")[0],
            args=[*training("align")[1], "--model", backbone.path, "--dataset", dataset.path,
                  *training_args(preset, overrides, model, mlpipeline_ui_metadata),
                  *state_args(state_root, run_id, "align")])

    return {"curate_plan": curate_plan, "curate_partition": curate_partition, "curate": curate, "pretrain": pretrain, "anchor": anchor, "gram": gram, "highres": highres,
            "distill": distill, "align": align}


def benchmark_component(model_names: Sequence[str], image: str = DEFAULT_IMAGE,
                        timm_baseline: str | None = None) -> Callable[..., Any]:
    """The benchmark component with one `Input[Model]` per model the DAG produced.

    Besides those it always compares a random-init backbone of the run's preset (`random:<preset>`:
    the SSL presets are named after their archs) and, when given, a timm backbone
    (`timm:<name>[@weights]`; see gramline.eval.features for what a weights-less one is). The
    string input `start_model` (the pipeline's `init_from`; empty: none) is passed as `--start-model`:
    the weights pretrain started from, compared as `start` and used as the Gram reference.
    """
    check_image(image)
    names = list(model_names)
    reserved = {"eval_dataset", "preset", "overrides", "metrics", "report", "report_md", "report_dir",
                "start_model", "random", "timm", "start"}
    if not names or len(set(names)) != len(names) or reserved & set(names):
        raise ValueError(f"benchmark model names must be unique, non-empty and not in {sorted(reserved)}: {names}")

    def benchmark(*values: Any):
        """Compare every model: k-NN, linear and segmentation probes, dense diagnostics, report."""
        bound = dict(zip(parameters_names, values))
        preset = bound["preset"]
        args: list[Any] = []
        for name in names:
            args += ["--model", dsl.ConcatPlaceholder([f"{name}=", bound[name].path])]
        args += ["--model", dsl.ConcatPlaceholder(["random=random:", preset])]
        if timm_baseline:
            args += ["--model", f"timm=timm:{timm_baseline}"]
        args += ["--eval-dataset", bound["eval_dataset"].path,
                 "--out-metrics", bound["metrics"].path, "--out-report", bound["report_dir"].path,
                 "--out-html", bound["report"].path, "--out-markdown", bound["report_md"].path,
                 "--start-model", bound["start_model"]]
        outputs = {key: bound[key] for key in ("metrics", "report", "report_md", "report_dir")}
        return dsl.ContainerSpec(image=image, command=stage_command("benchmark"),
                                 args=args + common_args(preset, bound["overrides"], outputs))

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [inspect.Parameter(name, kind, annotation=Input[Model]) for name in names]
    parameters += [
        inspect.Parameter("eval_dataset", kind, annotation=Input[Dataset]),
        inspect.Parameter("preset", kind, annotation=str),
        inspect.Parameter("overrides", kind, annotation=dict),
        inspect.Parameter("metrics", kind, annotation=Output[Metrics]),
        inspect.Parameter("report", kind, annotation=Output[HTML]),
        inspect.Parameter("report_md", kind, annotation=Output[Markdown]),
        inspect.Parameter("report_dir", kind, annotation=Output[Artifact]),
        inspect.Parameter("start_model", kind, default="", annotation=str),
    ]
    parameters_names = [p.name for p in parameters]
    benchmark.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    benchmark.__annotations__ = {p.name: p.annotation for p in parameters}
    return dsl.container_component(benchmark)
