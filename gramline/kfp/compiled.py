"""Reading a compiled pipeline (`gramline.yaml`) back: its spec, parameters, tasks and executors.

Local runs execute the compiled YAML, not the Python DAG, so they run exactly what a cluster would.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2 as pb

from gramline.errors import InputError

PARAMETER_TYPES = pb.ParameterType.ParameterTypeEnum


@dataclass(frozen=True)
class CompiledPipeline:
    path: Path
    spec: pb.PipelineSpec
    platform: dict[str, Any]  # the second YAML document (kfp-kubernetes settings), {} if none
    label: str = ""  # how errors name this pipeline (default: its path)

    @property
    def name(self) -> str:
        return self.spec.pipeline_info.name

    def parameters(self) -> dict[str, tuple[str, Any]]:
        """Pipeline parameter name → (KFP type name, default or None)."""
        out: dict[str, tuple[str, Any]] = {}
        for name, spec in self.spec.root.input_definitions.parameters.items():
            default = json_format.MessageToDict(spec.default_value) if spec.HasField("default_value") else None
            out[name] = (PARAMETER_TYPES.Name(spec.parameter_type), default)
        return out

    def task_names(self) -> list[str]:
        """Task names in DAG order (upstream first; ties alphabetical)."""
        tasks = self.spec.root.dag.tasks
        ordered: list[str] = []
        while len(ordered) < len(tasks):
            ready = sorted(n for n, t in tasks.items() if n not in ordered and set(t.dependent_tasks) <= set(ordered))
            if not ready:  # a cycle cannot come from the compiler; keep the rest as they are
                ready = sorted(set(tasks) - set(ordered))
            ordered.append(ready[0])
        return ordered

    def task(self, name: str) -> pb.PipelineTaskSpec:
        if name not in self.spec.root.dag.tasks:
            raise InputError(f"stage {name!r}", f"is not a task of {self.label or self.path}",
                             "one of " + ", ".join(self.task_names()))
        return self.spec.root.dag.tasks[name]

    def component(self, task: str) -> pb.ComponentSpec:
        return self.spec.components[self.task(task).component_ref.name]

    def executor(self, task: str) -> pb.PipelineDeploymentConfig.ExecutorSpec:
        deployment = json_format.ParseDict(json_format.MessageToDict(self.spec.deployment_spec),
                                           pb.PipelineDeploymentConfig())
        return deployment.executors[self.component(task).executor_label]

    def images(self) -> set[str]:
        executors = json_format.MessageToDict(self.spec.deployment_spec).get("executors", {})
        return {e["container"]["image"] for e in executors.values() if "container" in e}

    def task_parameters(self, task: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """The values the DAG passes to `task`'s input parameters, for these pipeline arguments."""
        defaults = {name: default for name, (_, default) in self.parameters().items()}
        values: dict[str, Any] = {}
        for name, spec in self.task(task).inputs.parameters.items():
            if spec.component_input_parameter:
                key = spec.component_input_parameter
                values[name] = arguments.get(key, defaults.get(key))
            elif spec.HasField("runtime_value"):
                values[name] = json_format.MessageToDict(spec.runtime_value.constant)
        return values


def load_compiled(path: Path | str) -> CompiledPipeline:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--pipeline {path}", "does not exist", "a pipeline YAML from pipeline/compile.py")
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        spec = json_format.ParseDict(documents[0], pb.PipelineSpec())
    except (yaml.YAMLError, json_format.ParseError, IndexError, TypeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"--pipeline {path}", f"is not a compiled KFP pipeline ({reason})",
                         "a pipeline YAML from pipeline/compile.py") from None
    if not spec.root.dag.tasks:
        raise InputError(f"--pipeline {path}", "has no DAG tasks", "a pipeline YAML, not a component YAML")
    platform = documents[1].get("platforms", {}) if len(documents) > 1 and isinstance(documents[1], dict) else {}
    return CompiledPipeline(path, spec, platform)


def compile_to(directory: Path | str, profile: str, image: str, pvc: str | None = None) -> CompiledPipeline:
    """Compile the pipeline for deployment profile `profile` and `image` to `<directory>/gramline.yaml`
    and load it."""
    from dataclasses import replace

    from gramline.kfp.pipeline import compile_pipeline

    pipeline = load_compiled(compile_pipeline(Path(directory) / "gramline.yaml", profile, image, pvc))
    return replace(pipeline, label=f"the pipeline (profile {profile})")


def compile_in_memory(profile: str, image: str) -> CompiledPipeline:
    with tempfile.TemporaryDirectory(prefix="gramline-compile-") as tmp:
        return compile_to(tmp, profile, image)


def parse_argument(pipeline: CompiledPipeline, item: str, flag: str = "--param") -> tuple[str, Any]:
    """`KEY=VALUE` → typed value for the pipeline parameter KEY (JSON for dicts, lists, numbers)."""
    key, sep, raw = item.partition("=")
    parameters = pipeline.parameters()
    if not sep or not key:
        raise InputError(f"{flag} {item!r}", "is malformed", "KEY=VALUE")
    if key not in parameters:
        raise InputError(f"{flag} {item!r}", f"{key!r} is not a pipeline parameter", "one of " + ", ".join(parameters))
    kind = parameters[key][0]
    if kind == "STRING":
        return key, raw
    try:
        value = json.loads(raw)
    except ValueError:
        raise InputError(f"{flag} {item!r}", "is not JSON", f"a JSON {kind.lower()} for {key}") from None
    expected = {"STRUCT": dict, "LIST": list, "BOOLEAN": bool, "NUMBER_INTEGER": int, "NUMBER_DOUBLE": (int, float)}
    if kind in expected and (not isinstance(value, expected[kind]) or (kind != "BOOLEAN" and isinstance(value, bool))):
        raise InputError(f"{flag} {item!r}", f"is a JSON {type(value).__name__}", f"a JSON {kind.lower()} for {key}")
    return key, value
