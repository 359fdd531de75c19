"""`gramline run` and `gramline rerun`: the compiled pipeline on one machine, without a cluster.

    gramline run [--profile tiny] [--runner process|docker] [--root DIR] [--pipeline FILE]
                 [--image IMAGE] [--train-gpus N] [--param KEY=VALUE ...] [--cache] [docker options]
    gramline rerun STAGE [--runner docker|process] --input NAME=PATH ... [--output NAME=PATH ...]
                 [--out-dir DIR] [--set key=value ...] [--profile P | --pipeline FILE] [--image IMAGE]
                 [--param KEY=VALUE ...] [docker options]
    docker options: [--shm-size 2g] [--gpus auto|all|none|N] [--docker-network host] [--as-root]

`--profile` (also spelled `--preset`, its older name) is the deployment profile to compile
(gramline/kfp/profiles.py). `run` compiles the pipeline (or takes `--pipeline FILE`), then executes that YAML through kfp.local:
`--runner docker` with `DockerRunner` in the image it names, `--runner process` with the same
container commands run in this Python environment (kfp.local's SubprocessRunner with its
lightweight-component checks switched off, as KFP's own tests do; kfp is pinned for this).
`rerun` takes one task of the compiled pipeline, fills its placeholders with your directories and
runs its command, in a container or as a process. In a container (Docker SDK) only the inputs
(read-only) and the output directories themselves (read-write) are bind-mounted, at the same paths;
small outputs (metrics, HTML, Markdown) are written to a private directory and moved into place after.
Containers run as your user (dockerhost.container_user), with shared memory and GPUs when present.
Both print where the outputs went; a stage that rejected its input makes either exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from gramline.errors import BAD_INPUT_EXIT_CODE, InputError
from gramline.kfp.profiles import add_profile_option, add_scheduling_options, scheduled_profile
from gramline.stages import CONFIG_SCHEMAS
from gramline.stages.common import UI_METADATA, StageArgumentParser, parse_named

PROCESS_HOOKS = ("validate_image", "validate_not_container_component", "validate_not_containerized_python_component")
PINNED_KFP = "2.17.3"


# --------------------------------------------------------------------------- process runner


@contextlib.contextmanager
def python_on_path() -> Iterator[None]:
    """Put this interpreter first on PATH as `python`: the compiled commands say `python -m ...`.

    A small exec script, not a symlink: Python finds its virtual environment from the path it was
    started by, so a symlink elsewhere would lose the venv's packages.
    """
    with tempfile.TemporaryDirectory(prefix="gramline-python-") as tmp:
        shim = Path(tmp) / "python"
        shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        shim.chmod(0o755)
        saved = os.environ.get("PATH", "")
        os.environ["PATH"] = tmp + os.pathsep + saved
        try:
            yield
        finally:
            os.environ["PATH"] = saved


@contextlib.contextmanager
def host_subprocess_runner() -> Iterator[Any]:
    """kfp.local's SubprocessRunner, allowed to run container components on this host.

    Uses kfp.local internals (pinned kfp==2.17.3; tests/test_local_run.py fails if they change):
    the handler's three validation hooks are replaced by no-ops for the duration of the run.
    """
    import kfp
    from kfp import local
    from kfp.local import subprocess_task_handler as sth

    handler = sth.SubprocessTaskHandler
    missing = [name for name in PROCESS_HOOKS if not callable(getattr(handler, name, None))]
    if missing:
        raise RuntimeError(f"kfp {kfp.__version__} lacks SubprocessTaskHandler.{missing}: the process runner "
                           f"needs kfp=={PINNED_KFP}")
    saved = {name: handler.__dict__[name] for name in PROCESS_HOOKS}
    for name in PROCESS_HOOKS:
        setattr(handler, name, lambda self, *args, **kwargs: None)
    try:
        with python_on_path():
            yield local.SubprocessRunner(use_venv=False)
    finally:
        for name, hook in saved.items():
            setattr(handler, name, hook)


# --------------------------------------------------------------------------- shared options


def _common_options(parser: argparse.ArgumentParser, default_runner: str) -> None:
    parser.add_argument("--runner", choices=("process", "docker"), default=default_runner)
    add_profile_option(parser, default="tiny")
    parser.add_argument("--pipeline", type=Path, default=None,
                        help="a compiled pipeline YAML to run instead of compiling one")
    parser.add_argument("--image", default=None, help="image to compile the pipeline with (default: the profile's, "
                                                     "as images/build.py tags it: gramline[-cuda]:VERSION-HASH)")
    add_scheduling_options(parser, kubernetes=False)
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="pipeline parameter, repeatable (values as JSON like `kfp run submit`)")
    parser.add_argument("--shm-size", default="2g", help="docker: /dev/shm size (default 2g)")
    parser.add_argument("--gpus", default="auto", help="docker: auto, all, none or a count (default auto)")
    parser.add_argument("--docker-network", default="host", help="docker: network mode (default host)")
    parser.add_argument("--as-root", action="store_true",
                        help="docker: run containers as root (default: your user; as root, the sudo caller or nobody)")


def _pipeline(args: argparse.Namespace, workdir: Path) -> Any:
    from gramline.kfp import compiled

    if args.pipeline is not None:
        if args.image is not None:
            raise InputError("--image", "cannot be combined with --pipeline", "the image the compiled YAML names")
        if args.train_gpus is not None:
            raise InputError("--train-gpus", "cannot be combined with --pipeline", "the GPUs the compiled YAML names")
        return compiled.load_compiled(args.pipeline)
    from gramline.kfp.components import check_image
    from gramline.kfp.pipeline import default_image

    profile = scheduled_profile(args)
    image = check_image(args.image) if args.image else default_image(profile)
    return compiled.compile_to(workdir, profile, image)  # type: ignore[arg-type]  # a customized profile


def _arguments(pipeline: Any, items: Sequence[str]) -> dict[str, Any]:
    from gramline.kfp.compiled import parse_argument

    return dict(parse_argument(pipeline, item) for item in items)


def _docker(args: argparse.Namespace, images: set[str]) -> tuple[Any, dict[str, Any]]:
    from gramline.kfp import dockerhost

    docker_client = dockerhost.client()
    for image in sorted(images):
        dockerhost.ensure_image(docker_client, image)
    settings = dockerhost.ContainerSettings(user=dockerhost.container_user(args.as_root), shm_size=args.shm_size,
                                            network=args.docker_network, gpus=args.gpus)
    return docker_client, settings.run_args(docker_client)


def _container_user(run_args: dict[str, Any]) -> tuple[int, int]:
    uid, gid = run_args["user"].split(":")
    return int(uid), int(gid)


@contextlib.contextmanager
def task_exit_codes() -> Iterator[list[int]]:
    """The exit code of every task kfp.local runs (it keeps only success or failure), so that a
    stage that rejected its input (exit 2) makes `gramline run` exit 2 as well.

    Wraps kfp.local internals (pinned kfp==2.17.3, like host_subprocess_runner).
    """
    from kfp.local import docker_task_handler, subprocess_task_handler

    codes: list[int] = []
    patched = ((subprocess_task_handler, "run_local_subprocess"), (docker_task_handler, "run_docker_container"))
    saved = [getattr(module, name) for module, name in patched]

    def recording(function: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> int:
            code = function(*args, **kwargs)
            codes.append(int(code))
            return code
        return run

    for (module, name), function in zip(patched, saved):
        setattr(module, name, recording(function))
    try:
        yield codes
    finally:
        for (module, name), function in zip(patched, saved):
            setattr(module, name, function)


def quiet_kfp_local_warnings() -> None:
    """kfp.local warns about every Kubernetes-only task setting (CPU, memory, accelerators, ...) that
    has no effect on one machine, and the process runner about images it does not use: both true,
    expected here, and noise in every run."""
    warnings.filterwarnings("ignore", message=r"Task '.*': settings .* have no effect in the current local runner")


# --------------------------------------------------------------------------- gramline run


def task_outputs(run_dir: Path) -> dict[str, dict[str, Path]]:
    """task → output name → path, for every task directory of a kfp.local run."""
    return {task.name: {out.name: out for out in sorted(task.iterdir()) if out.name != "executor_output.json"}
            for task in sorted(run_dir.iterdir()) if (task / "executor_output.json").is_file()}


def run_pipeline(args: argparse.Namespace) -> int:
    from kfp import local
    from kfp.local import pipeline_orchestrator

    quiet_kfp_local_warnings()
    runs = Path(args.root).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    pipeline = _pipeline(args, runs)
    arguments, source_paths = local_source(_arguments(pipeline, args.param))
    before = {p for p in runs.iterdir() if p.is_dir()}
    started = time.monotonic()
    print(f"gramline run: {pipeline.path} ({', '.join(pipeline.task_names())}) with the {args.runner} runner, "
          f"outputs under {runs}", flush=True)
    try:
        if args.runner == "docker":
            from gramline.kfp.dockerhost import writable_dir

            docker_client, run_args = _docker(args, pipeline.images())
            docker_client.close()
            if source_paths:  # kfp.local mounts the pipeline root (`volumes`); the source comes in beside it
                run_args["mounts"] = container_mounts({str(p): p for p in source_paths}, [])
            writable_dir(runs, _container_user(run_args))
            runner_context: Any = contextlib.nullcontext(local.DockerRunner(**run_args))
        else:
            runner_context = host_subprocess_runner()
        with runner_context as runner, task_exit_codes() as codes:
            local.init(runner=runner, pipeline_root=str(runs), raise_on_error=True, enable_caching=args.cache)
            pipeline_orchestrator.run_local_pipeline(pipeline.spec, arguments)
    except RuntimeError as err:
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # kfp.local colours its messages
        if "finished with status FAILURE" not in message:
            raise
        bad_input = BAD_INPUT_EXIT_CODE in codes
        print(f"gramline run: error: {message.splitlines()[0]}" + (" on a bad input" if bad_input else "")
              + " (its log is above)", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE if bad_input else 1
    new = sorted({p for p in runs.iterdir() if p.is_dir() and p.name.startswith(f"{pipeline.name}-")} - before)
    run_dir = new[-1] if new else runs
    print(f"gramline run: done in {time.monotonic() - started:.0f} s; outputs in {run_dir}:")
    for task, outputs in task_outputs(run_dir).items():
        for name, path in outputs.items():
            print(f"  {task}.{name}: {path}")
    return 0


# --------------------------------------------------------------------------- gramline rerun


def resolve_command(pipeline: Any, stage: str, inputs: dict[str, Path], outputs: dict[str, Path],
                    arguments: dict[str, Any], executor_output: Path) -> list[str]:
    """The task's command with every placeholder filled in for these local paths."""
    from kfp import dsl
    from kfp.local import executor_input_utils, placeholder_utils

    component = pipeline.component(stage)
    params = pipeline.task_parameters(stage, arguments)
    values: dict[str, Any] = {k: v for k, v in params.items() if k in component.input_definitions.parameters}
    for name, path in inputs.items():
        values[name] = dsl.Artifact(name=name, uri=str(path), metadata={})
    executor_input = executor_input_utils.construct_executor_input(
        component_spec=component, arguments=values, task_root=str(executor_output.parent), block_input_artifact=False)
    for name, path in outputs.items():
        executor_input.outputs.artifacts[name].artifacts[0].uri = str(path)
    executor_input.outputs.output_file = str(executor_output)
    container = pipeline.executor(stage).container
    return placeholder_utils.replace_placeholders(
        full_command=[*container.command, *container.args],
        executor_input_dict=executor_input_utils.executor_input_to_dict(executor_input, component),
        pipeline_resource_name=f"{pipeline.name}-rerun", task_resource_name=stage,
        pipeline_root=str(executor_output.parent), unique_pipeline_id=placeholder_utils.make_random_id())


def _artifact_paths(pipeline: Any, stage: str, args: argparse.Namespace) -> tuple[dict[str, Path], dict[str, Path]]:
    component = pipeline.component(stage)
    wanted_in = list(component.input_definitions.artifacts)
    wanted_out = list(component.output_definitions.artifacts)
    given_in = {k: Path(v).resolve() for k, v in parse_named(args.input, "--input").items()}
    given_out = {k: Path(v).resolve() for k, v in parse_named(args.output, "--output").items()}
    for flag, given, wanted in (("--input", given_in, wanted_in), ("--output", given_out, wanted_out)):
        unknown = sorted(set(given) - set(wanted))
        if unknown:
            raise InputError(f"{flag} {unknown[0]}", f"is not an {flag[2:]} of stage {stage}",
                             "one of " + (", ".join(wanted) or "(none)"))
    missing = [name for name in wanted_in if name not in given_in]
    if missing:
        raise InputError("--input", f"stage {stage} needs {', '.join(missing)}",
                         " ".join(f"--input {name}=PATH" for name in wanted_in))
    for name, path in given_in.items():
        if not path.exists():
            raise InputError(f"--input {name}={path}", "does not exist", "an artifact directory or file")
    out_dir = Path(args.out_dir or f"{stage}-outputs").resolve()
    outputs = {name: given_out.get(name, out_dir / name) for name in wanted_out}
    return given_in, outputs


def local_source(arguments: dict[str, Any]) -> tuple[dict[str, Any], list[Path]]:
    """`arguments` with a local curate `source` made absolute, and the host paths a container needs
    to read it: the directory or file, or a brace pattern's folder (`dir/train-{000..009}.tar`); none
    for s3:// and synthetic: sources, or a path that is not there (the stage itself says so)."""
    source = arguments.get("source")
    if not isinstance(source, str) or source.startswith("synthetic:") or ("://" in source and
                                                                         not source.startswith("file://")):
        return arguments, []
    text = source.removeprefix("file://")
    folder, name = os.path.split(text) if "{" in text else (text, "")
    if "{" in folder or not folder or not Path(folder).exists():
        return arguments, []
    path = Path(folder).resolve()
    return {**arguments, "source": str(path / name) if name else str(path)}, [path]


def container_mounts(inputs: dict[str, Path], writable: Sequence[Path]) -> list[Any]:
    """Bind mounts at the same paths: each input read-only, each writable directory read-write;
    nothing else of the host (no parent directories)."""
    import docker

    mounts = {str(path): docker.types.Mount(str(path), str(path), type="bind", read_only=True)
              for path in inputs.values()}
    mounts |= {str(path): docker.types.Mount(str(path), str(path), type="bind", read_only=False) for path in writable}
    return list(mounts.values())


def _run_container(docker_client: Any, image: str, command: list[str], run_args: dict[str, Any],
                   mounts: list[Any]) -> int:
    container = docker_client.containers.run(image, command=command, mounts=mounts, detach=True, **run_args)
    try:
        for chunk in container.logs(stream=True, follow=True):
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        return int(container.wait()["StatusCode"])
    finally:
        container.remove(force=True)


# Small outputs a stage writes by replacing the path itself (a file, renamed into place), which
# needs their parent: in a container they go to a private directory first (staged_outputs).
STAGED_ARTIFACTS = frozenset({"system.Metrics", "system.HTML", "system.Markdown", "system.ClassificationMetrics",
                              "system.SlicedClassificationMetrics"})


def staged_outputs(pipeline: Any, stage: str) -> set[str]:
    """Those outputs of `stage`: the small-artifact types and the training stages' KFP UI file."""
    specs = pipeline.component(stage).output_definitions.artifacts
    return {name for name, spec in specs.items()
            if spec.artifact_type.schema_title in STAGED_ARTIFACTS or name == UI_METADATA}


def check_stage_overrides(stage: str, overrides: Sequence[str]) -> None:
    """A misspelt `--set` key fails here, on the host, before any container starts."""
    from gramline.config import check_override_keys

    if not overrides or stage not in CONFIG_SCHEMAS:
        return
    module, name = CONFIG_SCHEMAS[stage].split(":")
    check_override_keys(getattr(importlib.import_module(module), name), overrides)


def _in_container(args: argparse.Namespace, image: str, command: list[str], inputs: dict[str, Path],
                  outputs: dict[str, Path], staged: dict[str, Path], workdir: Path) -> int:
    """Run the command in `image` with only its inputs and outputs mounted; move the staged outputs
    to where they were asked for once it succeeded."""
    from gramline.kfp.dockerhost import writable_dir

    docker_client, run_args = _docker(args, {image})
    user = _container_user(run_args)
    try:
        writable = [writable_dir(workdir, user)]
        writable += [writable_dir(path, user) for name, path in sorted(outputs.items()) if name not in staged]
        for path in staged.values():
            writable_dir(path.parent, user)
        code = _run_container(docker_client, image, command, run_args, container_mounts(inputs, writable))
    finally:
        docker_client.close()
    if code == 0:
        for name, path in staged.items():
            target = outputs[name]
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            target.unlink(missing_ok=True)
            shutil.move(path, target)
    return code


def rerun_stage(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix=f"gramline-rerun-{args.stage}-"))
    try:
        pipeline = _pipeline(args, workdir)
        arguments, source_paths = local_source(_arguments(pipeline, args.param))
        pipeline.task(args.stage)
        inputs, outputs = _artifact_paths(pipeline, args.stage, args)
        check_stage_overrides(args.stage, args.overrides)
        executor_output = workdir / "executor_output.json"
        # in a container, small outputs go to the private work directory first (their parents stay unmounted)
        staged = ({name: workdir / "staged" / name / outputs[name].name for name in staged_outputs(pipeline, args.stage)}
                  if args.runner == "docker" else {})
        command = resolve_command(pipeline, args.stage, inputs, outputs | staged, arguments, executor_output)
        for item in args.overrides:
            command += ["--set", item]
        image = pipeline.executor(args.stage).container.image
        print(f"gramline rerun: {args.stage} ({args.runner}{', image ' + image if args.runner == 'docker' else ''})",
              flush=True)
        if args.runner == "docker":
            readable = {**inputs, **{f"source-{i}": path for i, path in enumerate(source_paths)}}
            code = _in_container(args, image, command, readable, outputs, staged, workdir)
        else:
            with python_on_path():
                code = subprocess.run(command, check=False).returncode
        if code != 0:
            print(f"gramline rerun: {args.stage} exited with {code}", file=sys.stderr)
            return code
        written = json.loads(executor_output.read_text()) if executor_output.is_file() else {}
        print(f"gramline rerun: {args.stage} done; outputs:")
        for name, path in outputs.items():
            entry = written.get("artifacts", {}).get(name, {}).get("artifacts", [{}])[0]
            keys = ", ".join(sorted(entry.get("metadata", {}))[:8])
            print(f"  {name}: {path}" + (f" (metadata: {keys})" if keys else ""))
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- CLI


def run_parser() -> argparse.ArgumentParser:
    parser = StageArgumentParser(prog="gramline run", description="Run the compiled pipeline on this machine.")
    _common_options(parser, default_runner="process")
    parser.add_argument("--root", default="gramline-runs",
                        help="runs go to DIR/<pipeline>-<timestamp>/<task>/<output> (default ./gramline-runs)")
    parser.add_argument("--cache", action="store_true", help="let kfp.local reuse cached task outputs")
    return parser


def rerun_parser() -> argparse.ArgumentParser:
    parser = StageArgumentParser(prog="gramline rerun", description="Re-run one stage of the compiled pipeline.")
    parser.add_argument("stage", help="task name in the pipeline (curate, pretrain, ..., benchmark)")
    _common_options(parser, default_runner="docker")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--output", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--out-dir", default=None, help="outputs not named by --output go to DIR/NAME "
                                                        "(default ./STAGE-outputs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="stage config override, repeatable (added after the pipeline's)")
    return parser


def main(command: str, argv: Sequence[str]) -> int:
    if command == "run":
        return run_pipeline(run_parser().parse_args(argv))
    if command == "rerun":
        return rerun_stage(rerun_parser().parse_args(argv))
    raise InputError(f"command {command!r}", "is unknown", "run or rerun")


def main_cli(command: str, argv: Sequence[str] | None = None) -> NoReturn:
    try:
        code = main(command, list(sys.argv[1:] if argv is None else argv))
    except InputError as err:
        print(f"gramline {command}: error: {err}", file=sys.stderr)
        sys.exit(BAD_INPUT_EXIT_CODE)
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in ("kfp", "docker"):
            print(f"gramline {command}: error: {err.name} is not installed (pip install 'gramline[pipeline]')",
                  file=sys.stderr)
            sys.exit(BAD_INPUT_EXIT_CODE)
        raise
    sys.exit(code)
