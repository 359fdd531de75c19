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

The image is fixed when the components are built (`build_components(image)`), so a compiled
pipeline names exactly one image. The command says `python`, never `python3`: kfp.local's process
runner rewrites every `python3` substring.
"""

# no `from __future__ import annotations`: KFP reads the real annotation objects

import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from gramline import __version__
from gramline.errors import InputError

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


def stage_command(stage: str) -> list[str]:
    return ["python", "-m", f"gramline.stages.{stage}"]


def common_args(preset: Any, overrides: Any, outputs: dict[str, Any]) -> list[Any]:
    """Flags every stage takes (gramline.stages.common), with the KFP URI of each output."""
    args: list[Any] = ["--preset", preset, "--overrides", overrides, "--executor-output", EXECUTOR_OUTPUT]
    for name, artifact in outputs.items():
        args += ["--output-uri", dsl.ConcatPlaceholder([f"{name}=", artifact.uri])]
    return args


def build_components(image: str = DEFAULT_IMAGE) -> dict[str, Callable[..., Any]]:
    """The training-line components for `image`, by stage name (benchmark: `benchmark_component`)."""
    check_image(image)

    @dsl.container_component
    def curate(source: str, preset: str, overrides: dict, dataset: Output[Dataset]):
        """Ingest, validate, deduplicate, balance and shard images into a Dataset (train + eval)."""
        return dsl.ContainerSpec(
            image=image, command=stage_command("curate"),
            args=["--source", source, "--out-dataset", dataset.path,
                  *common_args(preset, overrides, {"dataset": dataset})])

    @dsl.container_component
    def pretrain(dataset: Input[Dataset], preset: str, overrides: dict, model: Output[Model], init_from: str = ""):
        """DINOv3 SSL pretraining (DINO + iBOT + KoLeo) on the Dataset's train shards; from `init_from`
        (timm:<name>[@file], a Model directory or an official checkpoint file) when given, else from scratch."""
        return dsl.ContainerSpec(
            image=image, command=stage_command("pretrain"),
            args=["--dataset", dataset.path, "--out-model", model.path, "--init-from", init_from,
                  *common_args(preset, overrides, {"model": model})])

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
             overrides: dict, model: Output[Model]):
        """Continue the pretrain run with Gram anchoring against the anchor's backbone."""
        return dsl.ContainerSpec(
            image=image, command=stage_command("gram"),
            args=["--model", pretrained.path, "--anchor", anchor.path, "--dataset", dataset.path,
                  "--out-model", model.path, *common_args(preset, overrides, {"model": model})])

    @dsl.container_component
    def highres(anchored: Input[Model], dataset: Input[Dataset], preset: str, overrides: dict,
                model: Output[Model]):
        """Mixed-resolution adaptation with a fixed Gram teacher at 1.5x resolution."""
        return dsl.ContainerSpec(
            image=image, command=stage_command("highres"),
            args=["--model", anchored.path, "--dataset", dataset.path, "--out-model", model.path,
                  *common_args(preset, overrides, {"model": model})])

    @dsl.container_component
    def distill(teacher: Input[Model], dataset: Input[Dataset], preset: str, overrides: dict, model: Output[Model]):
        """Distil the preset's students from the frozen teacher, sharing every teacher forward."""
        return dsl.ContainerSpec(
            image=image, command=stage_command("distill"),
            args=["--teacher", teacher.path, "--dataset", dataset.path, "--out-model", model.path,
                  *common_args(preset, overrides, {"model": model})])

    @dsl.container_component
    def align(backbone: Input[Model], dataset: Input[Dataset], preset: str, overrides: dict, model: Output[Model]):
        """Align a text tower to the frozen backbone (LiT / dino.txt): a captioned dataset, contrastive loss."""
        return dsl.ContainerSpec(
            image=image, command=stage_command("align"),
            args=["--model", backbone.path, "--dataset", dataset.path, "--out-model", model.path,
                  *common_args(preset, overrides, {"model": model})])

    return {"curate": curate, "pretrain": pretrain, "anchor": anchor, "gram": gram, "highres": highres,
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
