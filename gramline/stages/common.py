"""What every stage entry point shares: common flags, the exit-code contract, executor output.

Flags common to all stages:
  --preset NAME          named preset (default: tiny)
  --config FILE          YAML config merged over the preset
  --set key=value        dotted override, repeatable
  --overrides JSON       a JSON object of dotted overrides (what KFP components pass); applied
                         before the --set ones
  --executor-output FILE where KFP wants the ExecutorOutput JSON ({{$.outputs.output_file}})
  --output-uri NAME=URI  the KFP URI of output artifact NAME (its `.uri` placeholder), repeatable
  --gpus N               the GPUs the task was compiled with (training components pass it): a
                         `--preset` sized for another count is warned about on stderr
                         (gramline.kfp.profiles.preset_gpus_warning)
and, in the training stages (`add_state_option`):
  --state-uri URI        a PVC directory or s3://bucket/prefix, one per run and task, where every
                         checkpoint is mirrored; a start with no local state resumes from it, and a
                         bad input recorded there makes a retry exit 2 at once (empty: off)
  --out-ui-metadata FILE the KFP UI's visualization file: a TensorBoard viewer of the Model's
                         event files (`add_ui_metadata_option`, `emit_training_output`)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from gramline.artifacts import uri_for, write_executor_output
from gramline.errors import BAD_INPUT_EXIT_CODE, TRANSIENT_EXIT_CODE, InputError, TransientError
from gramline.io import write_json_atomic

UI_METADATA = "mlpipeline_ui_metadata"  # the output name the KFP UI's Visualizations tab looks for


class StageArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors as exit 2 with one line (its default is also 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(BAD_INPUT_EXIT_CODE)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        if getattr(parsed, "overrides_json", None) is not None:
            parsed.overrides = json_overrides(parsed.overrides_json) + list(parsed.overrides)
        if getattr(parsed, "task_gpus", None) is not None and os.environ.get("RANK", "0") == "0":
            from gramline.kfp.profiles import preset_gpus_warning

            warning = preset_gpus_warning(parsed.preset, parsed.task_gpus)
            if warning:
                print(f"{self.prog}: warning: {warning}", file=sys.stderr, flush=True)
        return parsed


def json_overrides(text: str) -> list[str]:
    """`{"train.steps": 10, "optim.lr": {"peak": 1e-3}}` → ["train.steps=10", "optim.lr={...}"]."""
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError as err:
        raise InputError("--overrides", f"is not valid JSON ({err})", 'a JSON object such as {"train.steps": 10}') from None
    if not isinstance(value, dict):
        raise InputError("--overrides", f"is a JSON {type(value).__name__}", 'a JSON object such as {"train.steps": 10}')
    return [f"{key}={json.dumps(item)}" for key, item in value.items()]


def stage_parser(stage: str, description: str) -> StageArgumentParser:
    parser = StageArgumentParser(prog=f"python -m gramline.stages.{stage}", description=description)
    parser.add_argument("--preset", default="tiny", help="named preset (default: tiny)")
    parser.add_argument("--config", type=Path, default=None, help="YAML config merged over the preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override, repeatable (e.g. --set train.steps=100)")
    parser.add_argument("--overrides", dest="overrides_json", default=None, metavar="JSON",
                        help='JSON object of dotted overrides, e.g. {"train.steps": 100}')
    parser.add_argument("--executor-output", type=Path, default=None,
                        help="path for the KFP ExecutorOutput JSON ({{$.outputs.output_file}})")
    parser.add_argument("--output-uri", action="append", default=[], metavar="NAME=URI",
                        help="KFP URI of an output artifact, repeatable")
    parser.add_argument("--gpus", dest="task_gpus", type=int, default=None, metavar="N",
                        help="GPUs the task was compiled with; a --preset sized for another count is warned about")
    return parser


def add_state_option(parser: argparse.ArgumentParser) -> None:
    """`--state-uri` of the training stages (gramline.train.state_sync)."""
    parser.add_argument("--state-uri", default="", metavar="URI",
                        help="PVC directory or s3://bucket/prefix (one per run and task) where checkpoints are "
                             "mirrored, so that a retried task on a new pod resumes; empty: off")


def parse_named(items: Sequence[str], flag: str) -> dict[str, str]:
    """Parse repeated NAME=VALUE flags, rejecting malformed or duplicate names."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise InputError(f"{flag} {item!r}", "is malformed", "NAME=VALUE")
        if name in out:
            raise InputError(f"{flag} {item!r}", f"repeats the name {name!r}", "each name once")
        out[name] = value
    return out


def emit_executor_output(
    args: argparse.Namespace,
    artifacts: Mapping[str, tuple[Path, Mapping[str, Any]]],
    parameters: Mapping[str, Any] | None = None,
) -> None:
    """Write the executor output: `artifacts` maps output name → (local path, metadata)."""
    uris = parse_named(args.output_uri, "--output-uri")
    write_executor_output(
        args.executor_output,
        {name: (uri_for(path, uris.get(name)), meta) for name, (path, meta) in artifacts.items()},
        parameters,
    )


def add_ui_metadata_option(parser: argparse.ArgumentParser) -> None:
    """`--out-ui-metadata` of the training stages (`emit_training_output`)."""
    parser.add_argument("--out-ui-metadata", type=Path, default=None, metavar="FILE",
                        help=f"where to write the KFP UI's visualization file (the {UI_METADATA} output): "
                             "a TensorBoard viewer of the Model's event files")


def emit_training_output(args: argparse.Namespace, metadata: Mapping[str, Any], tensorboard_dir: Path | None) -> None:
    """The executor output of a training stage: its Model (metadata `tensorboard_logdir`: the event
    files' URI, when TensorBoard logging is on) and, with `--out-ui-metadata`, the KFP UI's
    visualization file. The KFP UI shows a "Start Tensorboard" button for a task's system.Artifact
    output named mlpipeline_ui_metadata that holds {"outputs": [{"type": "tensorboard", "source": URI}]}
    (the v1 output-viewer format, https://www.kubeflow.org/docs/pipelines/output-viewer; read in v2 by
    github.com/kubeflow/pipelines frontend/src/components/viewers/MetricsVisualizations.tsx)."""
    model = dict(metadata)
    outputs = []
    if tensorboard_dir is not None:
        model_uri = uri_for(args.out_model, parse_named(args.output_uri, "--output-uri").get("model"))
        logdir = f"{model_uri.rstrip('/')}/{tensorboard_dir.relative_to(args.out_model).as_posix()}"
        model["tensorboard_logdir"] = logdir
        outputs.append({"type": "tensorboard", "source": logdir})
    artifacts: dict[str, tuple[Path, Mapping[str, Any]]] = {"model": (args.out_model, model)}
    if args.out_ui_metadata is not None:
        write_json_atomic(args.out_ui_metadata, {"outputs": outputs})
        artifacts[UI_METADATA] = (args.out_ui_metadata, {})
    emit_executor_output(args, artifacts)


def _verdict_guard(argv: Sequence[str] | None) -> contextlib.AbstractContextManager[None]:
    """The bad-input verdict of `--state-uri` when the command line has one (gramline.train.state_sync)."""
    picker = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    picker.add_argument("--state-uri", default="")
    uri = picker.parse_known_args(argv)[0].state_uri
    if not uri:
        return contextlib.nullcontext()
    from gramline.train.state_sync import StateSync  # imports torch: only for the training stages

    return StateSync(uri).verdict_guard()


def run_stage(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run a stage's main: InputError → one clear paragraph on stderr and exit 2; TransientError
    (a service still failing after its retries) → the same, exit 75, so that a retry may follow.
    With `--state-uri`, a bad input is recorded there and a retry exits 2 before any work."""
    try:
        with _verdict_guard(argv):
            code = main(argv)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(BAD_INPUT_EXIT_CODE)
    except TransientError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(TRANSIENT_EXIT_CODE)
    sys.exit(code or 0)
