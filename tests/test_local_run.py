"""`gramline run/rerun` without Docker: the kfp.local process-runner hook (pinned kfp), a stage
re-run on local directories from its compiled spec, and the one-line errors (exit 2)."""

# no `from __future__ import annotations`: the component below needs real annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

kfp = pytest.importorskip("kfp")

from gramline.kfp import local_run
from gramline.kfp.pipeline import BENCHMARK, STAGES

REPO = Path(__file__).resolve().parents[1]


def gramline(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
             timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from gramline.cli import main; main()", *args],
                          check=False, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, done.stderr
    return lines[0]


# --------------------------------------------------------------------------- the pinned kfp.local hook


def test_kfp_is_the_pinned_version_with_the_subprocess_hooks() -> None:
    """The process runner switches off these SubprocessTaskHandler checks: fail loudly if kfp moves."""
    from kfp.local import subprocess_task_handler as sth

    assert kfp.__version__ == local_run.PINNED_KFP
    for name in local_run.PROCESS_HOOKS:
        assert callable(sth.SubprocessTaskHandler.__dict__.get(name)), name
    assert callable(sth.replace_python_executable) and callable(sth.run_local_subprocess)


def test_stock_subprocess_runner_refuses_container_components_and_the_hook_allows_one(tmp_path: Path) -> None:
    from kfp import dsl, local
    from kfp.dsl import Dataset, Output
    from kfp.local import subprocess_task_handler as sth

    @dsl.container_component
    def write(text: str, out: Output[Dataset]):
        code = ("import json, pathlib, sys; p = pathlib.Path(sys.argv[2]); p.parent.mkdir(parents=True, exist_ok=True);"
                "p.write_text(sys.argv[1]); e = pathlib.Path(sys.argv[3]); e.parent.mkdir(parents=True, exist_ok=True);"
                "e.write_text(json.dumps({'artifacts': {'out': {'artifacts': [{'name': 'out', 'uri': sys.argv[4],"
                " 'metadata': {'chars': len(sys.argv[1])}}]}}}))")
        return dsl.ContainerSpec(image="gramline:0.1.0", command=["python", "-c", code],
                                 args=[text, out.path, dsl.PIPELINE_TASK_EXECUTOR_OUTPUT_PATH_PLACEHOLDER, out.uri])

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "stock"))
    with pytest.raises(RuntimeError, match="only supports running Lightweight Python Components"):
        write(text="hello")
    originals = {name: sth.SubprocessTaskHandler.__dict__[name] for name in local_run.PROCESS_HOOKS}
    with local_run.host_subprocess_runner() as runner:
        local.init(runner=runner, pipeline_root=str(tmp_path / "hooked"))
        task = write(text="hello")
    assert {name: sth.SubprocessTaskHandler.__dict__[name] for name in local_run.PROCESS_HOOKS} == originals
    out = task.outputs["out"]
    assert Path(out.path).read_text() == "hello" and out.metadata == {"chars": 5}


# --------------------------------------------------------------------------- gramline rerun (process)


@pytest.mark.slow
def test_rerun_pretrain_as_a_process_on_local_directories(tmp_path: Path, small_dataset: Path) -> None:
    out = tmp_path / "mine" / "model"
    done = gramline("rerun", "pretrain", "--runner", "process", "--input", f"dataset={small_dataset}",
                    "--output", f"model={out}", "--set", "train.steps=2", "--set", "train.checkpoint_every=1",
                    "--set", "train.teacher_checkpoint_every=1", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"model: {out}" in done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "Model" and manifest["step"] == 2  # the --set came after the pipeline's own
    assert manifest["config"]["train"]["batch_size"] == 8  # the tiny pipeline preset's override still applies
    assert (out / "backbone.safetensors").is_file()


def test_resolve_command_fills_every_placeholder(tmp_path: Path, small_dataset: Path) -> None:
    from gramline.kfp.compiled import compile_in_memory

    pipeline = compile_in_memory("tiny", "gramline:0.1.0")
    out = tmp_path / "m"
    command = local_run.resolve_command(pipeline, "pretrain", {"dataset": small_dataset}, {"model": out},
                                        {"pretrain_overrides": {"train.steps": 3}}, tmp_path / "eo.json")
    assert command[:3] == ["python", "-m", "gramline.stages.pretrain"]
    assert not any("{{" in part for part in command)
    flags = dict(zip(command[3::2], command[4::2]))
    assert flags["--dataset"] == str(small_dataset) and flags["--out-model"] == str(out)
    assert flags["--executor-output"] == str(tmp_path / "eo.json")
    uris = [value for flag, value in zip(command[3::2], command[4::2]) if flag == "--output-uri"]
    assert uris[0] == f"model={out}"  # and the ones of the outputs not named (the KFP UI file of a training stage)
    assert flags["--preset"] == "tiny" and json.loads(flags["--overrides"]) == {"train.steps": 3}


def test_init_from_param_reaches_the_pretrain_and_benchmark_commands(tmp_path: Path) -> None:
    """`gramline run/rerun --param init_from=SPEC`: the compiled YAML, with kfp.local's placeholder
    filling, gives pretrain `--init-from SPEC` and the benchmark `--start-model SPEC`; without it both get ''."""
    from gramline.kfp.compiled import compile_in_memory

    pipeline = compile_in_memory("tiny", "gramline:0.1.0")
    spec = "timm:vit_small_patch16_dinov3@/weights/vits16.safetensors"
    given = local_run._arguments(pipeline, [f"init_from={spec}"])
    assert given == {"init_from": spec}
    bench = pipeline.component("benchmark")
    bench_in = {name: tmp_path / name for name in bench.input_definitions.artifacts}
    bench_out = {name: tmp_path / "out" / name for name in bench.output_definitions.artifacts}
    for arguments, expected in ((given, spec), ({}, "")):
        pretrain = local_run.resolve_command(pipeline, "pretrain", {"dataset": tmp_path / "d"}, {"model": tmp_path / "m"},
                                             arguments, tmp_path / "eo.json")
        assert pretrain[pretrain.index("--init-from") + 1] == expected
        command = local_run.resolve_command(pipeline, "benchmark", bench_in, bench_out, arguments, tmp_path / "eo.json")
        assert command[:3] == ["python", "-m", "gramline.stages.benchmark"]
        assert command[command.index("--start-model") + 1] == expected
        assert not any("{{" in part for part in command)


# --------------------------------------------------------------------------- one-line errors


def test_rerun_an_unknown_stage(tmp_path: Path) -> None:
    line = one_error_line(gramline("rerun", "distil", "--runner", "process", cwd=tmp_path))
    assert "stage 'distil'" in line and "curate, pretrain" in line


def test_rerun_with_a_missing_input(tmp_path: Path) -> None:
    line = one_error_line(gramline("rerun", "pretrain", "--runner", "process", cwd=tmp_path))
    assert "stage pretrain needs dataset" in line


def test_rerun_with_an_unknown_input_name(tmp_path: Path, small_dataset: Path) -> None:
    line = one_error_line(gramline("rerun", "pretrain", "--runner", "process", "--input", f"data={small_dataset}",
                                   cwd=tmp_path))
    assert "--input data: is not an input of stage pretrain" in line and "dataset" in line


def test_rerun_with_an_input_path_that_does_not_exist(tmp_path: Path) -> None:
    line = one_error_line(gramline("rerun", "pretrain", "--runner", "process", "--input",
                                   f"dataset={tmp_path / 'nope'}", cwd=tmp_path))
    assert "does not exist" in line


def test_run_with_a_bad_image_name(tmp_path: Path) -> None:
    line = one_error_line(gramline("run", "--image", "Bad:Image:Name", "--root", str(tmp_path), cwd=tmp_path))
    assert "--image 'Bad:Image:Name': is not a valid image reference" in line


def test_run_with_an_unknown_parameter_and_a_bad_value(tmp_path: Path) -> None:
    line = one_error_line(gramline("run", "--param", "steps=3", "--root", str(tmp_path), cwd=tmp_path))
    assert "'steps' is not a pipeline parameter" in line
    line = one_error_line(gramline("run", "--param", "pretrain_overrides=[1]", "--root", str(tmp_path), cwd=tmp_path))
    assert "is a JSON list" in line and "struct" in line


@pytest.mark.parametrize("command", [["run"], ["rerun", "pretrain", "--input", "dataset=."]])
def test_docker_runner_without_a_daemon(tmp_path: Path, command: list[str]) -> None:
    import os

    env = dict(os.environ, DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock")
    line = one_error_line(gramline(*command, "--runner", "docker", "--root", str(tmp_path), env=env, cwd=tmp_path)
                          if command == ["run"] else
                          gramline(*command, "--runner", "docker", env=env, cwd=tmp_path))
    assert "no Docker daemon is reachable" in line and "--runner process" in line


def test_run_with_a_pipeline_file_that_is_not_a_pipeline(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("just: a mapping\n")
    line = one_error_line(gramline("run", "--pipeline", str(bad), "--root", str(tmp_path), cwd=tmp_path))
    assert f"--pipeline {bad}" in line


def test_a_misspelt_set_key_fails_on_the_host_before_any_container(tmp_path: Path, small_dataset: Path) -> None:
    import os

    # no daemon answers here: had the key not been checked first, the error would be about Docker
    env = dict(os.environ, DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock")
    line = one_error_line(gramline("rerun", "pretrain", "--runner", "docker", "--input", f"dataset={small_dataset}",
                                   "--set", "train.stepz=3", env=env, cwd=tmp_path))
    assert "config key 'train.stepz': does not exist" in line and "steps" in line


@pytest.mark.parametrize("stage", [*(s.name for s in STAGES), BENCHMARK.name])
def test_every_stage_checks_set_keys_on_the_host(stage: str) -> None:
    from gramline.errors import InputError

    with pytest.raises(InputError, match="config key 'nosuch': does not exist"):
        local_run.check_stage_overrides(stage, ["nosuch.key=1"])
    valid = {"curate": "dedup.threshold=0.9", "anchor": "anchor.images=4", "benchmark": "linear.epochs=2"}
    local_run.check_stage_overrides(stage, [valid.get(stage, "train.steps=3")])  # a real key passes


def test_a_bad_config_key_inside_the_dag_exits_2_without_warning_noise(tmp_path: Path) -> None:
    done = gramline("run", "--profile", "tiny", "--root", str(tmp_path), "--param",
                    'curate_overrides={"split.eval_fractoin": 0.3}', cwd=tmp_path, timeout=600)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "config key 'split.eval_fractoin': does not exist" in done.stdout + done.stderr
    assert "on a bad input" in done.stderr.splitlines()[-1]
    # kfp.local's per-task notes that CPU/memory settings do nothing on one machine are silenced
    assert "Warning" not in done.stdout + done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize(("uid", "env", "as_root", "expected"), [
    (1000, {}, False, (1000, 1000)),                                 # a user: that user
    (0, {"SUDO_UID": "1001", "SUDO_GID": "1002"}, False, (1001, 1002)),  # root through sudo: the sudo caller
    (0, {}, False, (65534, 65534)),                                  # root: nobody
    (0, {"SUDO_UID": "0"}, False, (65534, 65534)),                   # root from root's sudo: still nobody
    (1000, {}, True, (0, 0)),                                        # --as-root
])
def test_containers_never_run_as_root_unless_asked(monkeypatch: pytest.MonkeyPatch, uid: int, env: dict,
                                                   as_root: bool, expected: tuple) -> None:
    from gramline.kfp import dockerhost

    monkeypatch.setattr(dockerhost.os, "getuid", lambda: uid)
    monkeypatch.setattr(dockerhost.os, "getgid", lambda: uid)
    for name in ("SUDO_UID", "SUDO_GID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert dockerhost.container_user(as_root) == expected


def test_gramline_help_lists_exactly_the_commands_that_answer(tmp_path: Path) -> None:
    """Every command `gramline --help` names shows its own help (exit 0), and every stage, plus run and
    rerun, is named."""
    import re

    from gramline.stages import STAGES

    done = gramline("--help", cwd=tmp_path)
    assert done.returncode == 0
    named = set(re.findall(r"^  gramline (\w+)", done.stdout, re.MULTILINE))
    stages = re.search(r"^Stages: (.*)\.$", done.stdout, re.MULTILINE).group(1).split(", ")
    assert {"data", "export", "run", "rerun"} <= named and stages == list(STAGES)
    for command in sorted(named | set(stages)):
        args = [command, "synth"] if command == "data" else [command]
        shown = gramline(*args, "--help", cwd=tmp_path)
        assert shown.returncode == 0 and "usage:" in shown.stdout, (command, shown.stderr[-500:])
