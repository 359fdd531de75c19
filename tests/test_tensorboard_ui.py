"""TensorBoard in the KFP UI: every training component has a system.Artifact output named
mlpipeline_ui_metadata holding {"outputs": [{"type": "tensorboard", "source": <logdir URI>}]}, which
the KFP v2 UI's Visualizations tab turns into a "Start Tensorboard" button (kubeflow/pipelines,
frontend/src/components/viewers/MetricsVisualizations.tsx, getV1VisualizationArtifacts: a system.Artifact
whose output name, with every non-word character and `_` made `-`, is `mlpipeline-ui-metadata`).
"""

# no `from __future__ import annotations`: KFP reads the pipeline's real annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp import compiler, dsl, local

from gramline.kfp import local_run, trainjob
from gramline.kfp.compiled import compile_in_memory
from gramline.kfp.components import build_components
from gramline.kfp.multinode import multinode_component
from gramline.kfp.trainjob import TRAINING_STAGES

IMAGE = "ghcr.io/example/gramline:0.1.0"
QUICK = {"train.steps": 2, "train.checkpoint_every": 1, "train.batch_size": 4, "crops.n_local": 2,
         "heads.dino_prototypes": 32, "heads.ibot_prototypes": 32, "heads.dino_hidden": 32, "heads.ibot_hidden": 32}


def ui_name(name: str) -> str:
    """What the KFP UI compares with 'mlpipeline-ui-metadata' (getV1VisualizationArtifacts)."""
    return re.sub(r"[\W_]", "-", name).lower()


def test_every_training_task_has_one_ui_metadata_artifact_that_the_kfp_ui_recognises() -> None:
    pipeline = compile_in_memory("tiny", IMAGE)
    for task in pipeline.task_names():
        outputs = pipeline.component(task).output_definitions.artifacts
        matches = {name: spec.artifact_type.schema_title for name, spec in outputs.items()
                   if ui_name(name) == "mlpipeline-ui-metadata"}
        if task in TRAINING_STAGES:
            assert matches == {"mlpipeline_ui_metadata": "system.Artifact"}, task
        else:
            assert matches == {}, task  # the UI refuses a task with two of them; others have none


@pytest.fixture(scope="module")
def local_run_dir(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One kfp.local (process mode) run of the pretrain component twice: TensorBoard on (task
    `pretrain`) and off (task `pretrain-2`). The task directories of the run."""
    pretrain = build_components(IMAGE)["pretrain"]

    @dsl.pipeline
    def two(dataset_dir: str) -> None:
        data = dsl.importer(artifact_uri=dataset_dir, artifact_class=dsl.Dataset)
        pretrain(dataset=data.output, preset="tiny", overrides=QUICK)
        pretrain(dataset=data.output, preset="tiny", overrides={**QUICK, "train.loggers.tensorboard": False})

    root = tmp_path_factory.mktemp("tb-ui") / "root"
    with local_run.host_subprocess_runner() as runner:
        local.init(runner=runner, pipeline_root=str(root))
        two(dataset_dir=str(small_dataset))
    (run_dir,) = [p.parent for p in root.glob("*/pretrain")]
    return run_dir


def written(task_dir: Path) -> dict[str, Any]:
    """Output name → the artifact the task's executor output names (what kfp.local and KFP record)."""
    entries = json.loads((task_dir / "executor_output.json").read_text())["artifacts"]
    return {name: entry["artifacts"][0] for name, entry in entries.items()}


@pytest.mark.slow
def test_kfp_local_pretrain_names_its_tensorboard_logdir_for_the_ui(local_run_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    artifacts = written(local_run_dir / "pretrain")
    model, ui = artifacts["model"], artifacts["mlpipeline_ui_metadata"]
    ui_file = Path(ui["uri"])
    assert ui_file == local_run_dir / "pretrain" / "mlpipeline_ui_metadata" and ui_file.is_file()
    viewers = json.loads(ui_file.read_text())["outputs"]
    assert viewers == [{"type": "tensorboard", "source": model["uri"] + "/tensorboard"}]
    assert model["metadata"]["tensorboard_logdir"] == viewers[0]["source"]

    logdir = Path(viewers[0]["source"])
    assert list(logdir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(logdir))
    events.Reload()
    assert "total" in events.Tags()["scalars"]
    assert events.Scalars("total")[-1].step == QUICK["train.steps"]  # logged up to the run's last step


@pytest.mark.slow
def test_kfp_local_pretrain_without_tensorboard_names_no_viewer(local_run_dir: Path) -> None:
    artifacts = written(local_run_dir / "pretrain-2")
    assert json.loads(Path(artifacts["mlpipeline_ui_metadata"]["uri"]).read_text())["outputs"] == []
    assert "tensorboard_logdir" not in artifacts["model"]["metadata"]
    assert not (Path(artifacts["model"]["uri"]) / "tensorboard").exists()


def test_the_source_is_the_kfp_model_uri_when_the_model_lives_in_s3(tmp_path: Path) -> None:
    """On a cluster the Model's URI is an object-store one: the viewer reads the events from there."""
    from gramline.stages.common import emit_training_output, stage_parser

    model = tmp_path / "model"
    (model / "tensorboard").mkdir(parents=True)
    parser = stage_parser("pretrain", "x")
    parser.add_argument("--out-model", type=Path)
    parser.add_argument("--out-ui-metadata", type=Path)
    args = parser.parse_args(["--out-model", str(model), "--out-ui-metadata", str(tmp_path / "ui" / "file"),
                              "--executor-output", str(tmp_path / "eo.json"),
                              "--output-uri", "model=s3://bucket/v2/artifacts/run/pretrain/model",
                              "--output-uri", "mlpipeline_ui_metadata=s3://bucket/v2/artifacts/run/pretrain/ui"])
    emit_training_output(args, {"step": 2}, model / "tensorboard")
    logdir = "s3://bucket/v2/artifacts/run/pretrain/model/tensorboard"
    assert json.loads((tmp_path / "ui" / "file").read_text()) == {"outputs": [{"type": "tensorboard", "source": logdir}]}
    artifacts = written_file(tmp_path / "eo.json")
    assert artifacts["model"]["metadata"] == {"step": 2, "tensorboard_logdir": logdir}
    assert artifacts["mlpipeline_ui_metadata"]["uri"] == "s3://bucket/v2/artifacts/run/pretrain/ui"


def written_file(path: Path) -> dict[str, Any]:
    return {name: entry["artifacts"][0] for name, entry in json.loads(path.read_text())["artifacts"].items()}


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_the_multinode_launcher_takes_the_ui_file_and_passes_it_on_to_the_stage(stage: str, tmp_path: Path) -> None:
    """The launcher gets the file's path and URI, and the stage's own arguments after `--` name the
    same path (the launcher points it at the shared volume for the nodes and copies the file back)."""
    launcher = multinode_component(stage, IMAGE, nodes=2, gpus_per_node=1, cpu=None, memory=None,
                                   shared_root="/data/jobs", pvc="gramline-data")
    compiler.Compiler().compile(launcher, str(tmp_path / "c.yaml"))
    args = next(iter(yaml.safe_load((tmp_path / "c.yaml").read_text())["deploymentSpec"]["executors"].values()))[
        "container"]["args"]
    split = args.index("--")
    own, node = args[:split], args[split + 1:]
    path = "{{$.outputs.artifacts['mlpipeline_ui_metadata'].path}}"
    assert own[own.index("--out-ui-metadata") + 1] == path == node[node.index("--out-ui-metadata") + 1]
    uris = [json.loads(own[i + 1])["Concat"] for i, a in enumerate(own) if a == "--output-uri"]
    assert ["mlpipeline_ui_metadata=", "{{$.outputs.artifacts['mlpipeline_ui_metadata'].uri}}"] in uris
    filled = [re.sub(r"\{\{\$[^}]*\}\}", "x", arg) if isinstance(arg, str) else "x" for arg in own]
    assert trainjob.parser().parse_args(filled).out_ui_metadata == Path("x")


def test_rerun_in_docker_stages_the_ui_file_like_the_other_small_outputs() -> None:
    """`gramline rerun <stage> --runner docker` mounts a directory at each output path, except the
    outputs a stage renames into place, which go to a private directory first: the UI file is one."""
    pipeline = compile_in_memory("tiny", IMAGE)
    assert local_run.staged_outputs(pipeline, "pretrain") == {"mlpipeline_ui_metadata"}
    assert local_run.staged_outputs(pipeline, "anchor") == set()

