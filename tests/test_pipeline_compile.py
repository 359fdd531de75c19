"""The compiled pipeline IR (what the cluster runs): executors, DAG edges, Kubernetes settings,
retries and caching, compiled by `pipeline/compile.py` itself."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("kfp")

from gramline.kfp import pipeline as gp
from gramline.kfp.compiled import load_compiled

REPO = Path(__file__).resolve().parents[1]
COMPILE = REPO / "pipeline" / "compile.py"
IMAGE = "registry.example.com:5000/ml/gramline:0.1.0"

# The DAG's edges, written out independently of gramline.kfp.pipeline's table:
# (consumer task, input) -> (producer task, output).
EDGES = {
    ("curate", "parts"): ("curate-partitions", "Output"),  # curate's fan-out (plan -> partitions -> reduce)
    ("pretrain", "dataset"): ("curate", "dataset"),
    ("anchor", "pretrained"): ("pretrain", "model"),
    ("anchor", "dataset"): ("curate", "dataset"),
    ("gram", "pretrained"): ("pretrain", "model"),
    ("gram", "anchor"): ("anchor", "model"),
    ("gram", "dataset"): ("curate", "dataset"),
    ("highres", "anchored"): ("gram", "model"),
    ("highres", "dataset"): ("curate", "dataset"),
    ("distill", "teacher"): ("highres", "model"),
    ("distill", "dataset"): ("curate", "dataset"),
    ("align", "backbone"): ("distill", "model"),
    ("align", "dataset"): ("curate", "dataset"),
    ("benchmark", "eval_dataset"): ("curate", "dataset"),
    ("benchmark", "pretrain"): ("pretrain", "model"),
    ("benchmark", "anchor"): ("anchor", "model"),
    ("benchmark", "gram"): ("gram", "model"),
    ("benchmark", "highres"): ("highres", "model"),
    ("benchmark", "distill"): ("distill", "model"),
    ("benchmark", "align"): ("align", "model"),
}
STAGES = ["curate", "pretrain", "anchor", "gram", "highres", "distill", "align", "benchmark"]
TRAINING = ["pretrain", "gram", "highres", "distill", "align"]


def build_tag(*args: str) -> str:
    """The tag `images/build.py` gives the image it builds (no Docker needed for --print-tag)."""
    done = subprocess.run([sys.executable, str(REPO / "images" / "build.py"), "--print-tag", *args], check=True,
                          capture_output=True, text=True, timeout=60)
    return done.stdout.strip()


def compile_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(COMPILE), *args], check=False, capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("ir") / "gramline.yaml"
    done = compile_cli(out.parent, "--preset", "vitl16", "--image", IMAGE, "--pvc", "gramline-data",
                       "--output", str(out))
    assert done.returncode == 0, done.stderr
    spec, platform = [d for d in yaml.safe_load_all(out.read_text()) if d]
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_every_stage_exists_in_this_build() -> None:
    """The DAG below assumes every stage module is present; if one is missing the pipeline drops it."""
    assert [s.name for s in gp.active_stages()] + ["benchmark"] == STAGES


def test_one_container_executor_per_stage_with_the_image_and_stage_command(compiled: tuple[dict, dict]) -> None:
    spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert {f"exec-{s}" for s in STAGES} <= set(executors)  # (curate's fan-out adds its own)
    for name, executor in executors.items():
        assert executor["container"]["image"] == IMAGE, name
    for stage in STAGES:
        container = executors[f"exec-{stage}"]["container"]
        assert container["image"] == IMAGE
        # the training tasks' commands start one process per GPU: tests/test_torchrun_compiled.py runs them
        command = container["command"]
        assert command[0] == "python" and command[-2:] == ["-m", f"gramline.stages.{stage}"]
        if stage not in TRAINING:
            assert command == ["python", "-m", f"gramline.stages.{stage}"]
        assert not any("python3" in str(a) for a in command)
        args = container["args"]
        assert args[args.index("--executor-output") + 1] == "{{$.outputs.output_file}}"
        assert not any("python3" in str(a) for a in args)
    assert set(STAGES) <= set(spec["root"]["dag"]["tasks"])


def _flag(args: list[Any], flag: str) -> Any:
    return args[args.index(flag) + 1]


def test_artifact_placeholders_follow_the_dag_edges(compiled: tuple[dict, dict]) -> None:
    spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    seen = {}
    for task_name, task in tasks.items():
        for name, source in task.get("inputs", {}).get("artifacts", {}).items():
            out = source["taskOutputArtifact"]
            seen[(task_name, name)] = (out["producerTask"], out["outputArtifactKey"])
    assert seen == EDGES
    executors = spec["deploymentSpec"]["executors"]
    args = {s: executors[f"exec-{s}"]["container"]["args"] for s in STAGES}
    out_model = "{{$.outputs.artifacts['model'].path}}"
    assert _flag(args["curate"], "--source") == "{{$.inputs.parameters['source']}}"
    assert _flag(args["curate"], "--out-dataset") == "{{$.outputs.artifacts['dataset'].path}}"
    assert _flag(args["pretrain"], "--dataset") == "{{$.inputs.artifacts['dataset'].path}}"
    assert _flag(args["gram"], "--model") == "{{$.inputs.artifacts['pretrained'].path}}"
    assert _flag(args["gram"], "--anchor") == "{{$.inputs.artifacts['anchor'].path}}"
    assert _flag(args["highres"], "--model") == "{{$.inputs.artifacts['anchored'].path}}"
    assert _flag(args["distill"], "--teacher") == "{{$.inputs.artifacts['teacher'].path}}"
    assert _flag(args["align"], "--model") == "{{$.inputs.artifacts['backbone'].path}}"
    for stage in ("pretrain", "anchor", "gram", "highres", "distill", "align"):
        assert _flag(args[stage], "--out-model") == out_model
        assert _flag(args[stage], "--output-uri") == '{"Concat": ["model=", "{{$.outputs.artifacts[\'model\'].uri}}"]}'
        assert _flag(args[stage], "--overrides") == "{{$.inputs.parameters['overrides']}}"
        # the trained ones also write the KFP UI's TensorBoard viewer file and name its URI
        ui = "{{$.outputs.artifacts['mlpipeline_ui_metadata'].%s}}"
        assert ("--out-ui-metadata" in args[stage]) == (stage != "anchor")
        if stage != "anchor":
            assert _flag(args[stage], "--out-ui-metadata") == ui % "path"
            assert f'{{"Concat": ["mlpipeline_ui_metadata=", "{ui % "uri"}"]}}' in args[stage]
    bench = args["benchmark"]
    models = [bench[i + 1] for i, a in enumerate(bench) if a == "--model"]
    assert models == [
        *[f'{{"Concat": ["{m}=", "{{{{$.inputs.artifacts[\'{m}\'].path}}}}"]}}' for m in ("pretrain", "anchor", "gram", "highres",
                                                                                      "distill", "align")],
        '{"Concat": ["random=random:", "{{$.inputs.parameters[\'preset\']}}"]}',
        "timm=timm:vit_large_patch16_dinov3.lvd1689m",
    ]
    assert _flag(bench, "--out-html") == "{{$.outputs.artifacts['report'].path}}"
    assert _flag(bench, "--out-markdown") == "{{$.outputs.artifacts['report_md'].path}}"
    outputs = spec["components"]["comp-benchmark"]["outputDefinitions"]["artifacts"]
    assert {k: v["artifactType"]["schemaTitle"] for k, v in outputs.items()} == {
        "metrics": "system.Metrics", "report": "system.HTML", "report_md": "system.Markdown",
        "report_dir": "system.Artifact"}


def test_pipeline_parameters_and_their_wiring(compiled: tuple[dict, dict]) -> None:
    spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {"source", "preset", "curate_preset", "init_from", *(f"{s}_overrides" for s in STAGES)}
    assert params["preset"]["defaultValue"] == "vitl16" and params["curate_preset"]["defaultValue"] == "large"
    assert params["pretrain_overrides"]["parameterType"] == "STRUCT"
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["curate"]["inputs"]["parameters"]["preset"] == {"componentInputParameter": "curate_preset"}
    for stage in STAGES:
        wiring = tasks[stage]["inputs"]["parameters"]
        assert wiring["overrides"] == {"componentInputParameter": f"{stage}_overrides"}
        if stage != "curate":
            assert wiring["preset"] == {"componentInputParameter": "preset"}


def _flag_fed_by(spec: dict, task: str, flag: str) -> list[str]:
    """The pipeline parameters whose value reaches `task`'s command as the value of `flag`: through the
    task's input wiring (componentInputParameter) and its executor's `{{$.inputs.parameters[...]}}`."""
    component = spec["root"]["dag"]["tasks"][task]
    executor = spec["components"][component["componentRef"]["name"]]["executorLabel"]
    args = spec["deploymentSpec"]["executors"][executor]["container"]["args"]
    values = [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]
    wiring = component["inputs"].get("parameters", {})
    return [source["componentInputParameter"] for name, source in wiring.items()
            if "componentInputParameter" in source and f"{{{{$.inputs.parameters['{name}']}}}}" in values]


def test_init_from_reaches_pretrain_and_the_benchmark_start_model(compiled: tuple[dict, dict]) -> None:
    """`init_from` (empty = from scratch) is pretrain's --init-from and the benchmark's --start-model, and
    no other pipeline parameter feeds either flag; no other task sees it."""
    spec, _ = compiled
    assert spec["root"]["inputDefinitions"]["parameters"]["init_from"] == {
        "parameterType": "STRING", "defaultValue": "", "isOptional": True}
    assert _flag_fed_by(spec, "pretrain", "--init-from") == ["init_from"]
    assert _flag_fed_by(spec, "benchmark", "--start-model") == ["init_from"]
    readers = sorted(task for task, body in spec["root"]["dag"]["tasks"].items()
                     if any(src.get("componentInputParameter") == "init_from"
                            for src in body["inputs"].get("parameters", {}).values()))
    assert readers == ["benchmark", "pretrain"]


def test_kubernetes_settings_per_task(compiled: tuple[dict, dict]) -> None:
    spec, platform = compiled
    for stage in STAGES:
        k8s = platform[f"exec-{stage}"]
        assert k8s["emptyDirMounts"][0] | {"sizeLimit": None} == {
            "medium": "Memory", "mountPath": "/dev/shm", "volumeName": "dshm", "sizeLimit": None}
        assert k8s["pvcMount"][0]["mountPath"] == "/data" and k8s["pvcMount"][0]["constant"] == "gramline-data"
        secret = k8s["secretAsEnv"][0]
        assert secret["secretName"] == "gramline-s3"
        assert {(e["secretKey"], e["envVar"]) for e in secret["keyToEnv"]} >= {
            ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"), ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY")}
        # only the training tasks are pinned to a GPU product; every task has a GPU and tolerates its taint
        if stage in TRAINING:
            assert k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        else:
            assert "nodeSelector" not in k8s
        assert k8s["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert int(k8s["activeDeadlineSeconds"]) > 0
        context = k8s["securityContext"]
        assert context["runAsNonRoot"] is True and int(context["runAsUser"]) > 0
    executors = spec["deploymentSpec"]["executors"]
    for stage in TRAINING:
        resources = executors[f"exec-{stage}"]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert resources["accelerator"]["resourceCount"] == "8"
        assert resources["resourceCpuLimit"] == "96" and resources["resourceMemoryLimit"] == "900Gi"
        assert platform[f"exec-{stage}"]["emptyDirMounts"][0]["sizeLimit"] == "64Gi"
        assert platform[f"exec-{stage}"]["activeDeadlineSeconds"] == str(7 * 24 * 3600)
    assert executors["exec-benchmark"]["container"]["resources"]["accelerator"]["resourceCount"] == "1"


def test_retries_and_caching(compiled: tuple[dict, dict]) -> None:
    spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    for stage in STAGES:
        retry = tasks[stage]["retryPolicy"]
        assert retry["maxRetryCount"] == 2 and retry["backoffFactor"] == 2.0
        assert retry["backoffDuration"].endswith("s") and retry["backoffMaxDuration"].endswith("s")
    # KFP writes `cachingOptions: {}` for disabled caching.
    for stage in (*TRAINING, "curate"):
        assert "enableCache" not in tasks[stage]["cachingOptions"]
    for stage in ("anchor", "benchmark"):
        assert tasks[stage]["cachingOptions"] == {"enableCache": True}


def test_tiny_preset_defaults_and_no_gpu(tmp_path: Path) -> None:
    out = tmp_path / "tiny.yaml"
    assert compile_cli(tmp_path, "--preset", "tiny", "--output", str(out)).returncode == 0
    pipeline = load_compiled(out)
    params = pipeline.parameters()
    assert params["preset"] == ("STRING", "tiny")
    assert params["source"][1].startswith("synthetic:")
    assert params["pretrain_overrides"][1]["train.steps"] == 8
    assert pipeline.images() == {build_tag()}  # the CPU image, tagged as images/build.py tags it
    executors = pipeline.platform["kubernetes"]["deploymentSpec"]["executors"]
    assert all("secretAsEnv" not in e and "tolerations" not in e for e in executors.values())
    container = pipeline.executor("pretrain").container
    assert not container.resources.accelerator.resource_count


def test_tiny_profile_pretrain_overrides_hold_with_and_without_init_from(tmp_path: Path) -> None:
    """The tiny profile's default pretrain_overrides, as the stage reads them (--overrides JSON), give a
    valid config both from scratch and for a run with init_from (the adapt preset's head warm-up must
    stay below the shortened train.steps)."""
    import json

    from gramline.stages.common import json_overrides
    from gramline.train.recipes.dino.config import load_adapt_config, load_pretrain_config

    out = tmp_path / "tiny.yaml"
    assert compile_cli(tmp_path, "--profile", "tiny", "--output", str(out)).returncode == 0
    overrides = json_overrides(json.dumps(load_compiled(out).parameters()["pretrain_overrides"][1]))
    scratch = load_pretrain_config("tiny", None, overrides)
    adapt = load_adapt_config("tiny", None, overrides)
    assert 0 <= adapt.init.head_warmup_steps < adapt.train.steps == scratch.train.steps
    assert scratch.init.head_warmup_steps == load_pretrain_config("tiny").init.head_warmup_steps


def test_default_output_is_gramline_yaml_at_the_repo_root(tmp_path: Path) -> None:
    """Run from another directory: the default output still lands at <repo>/gramline.yaml."""
    target = REPO / "gramline.yaml"
    before = target.read_bytes() if target.exists() else None
    try:
        done = compile_cli(tmp_path)
        assert done.returncode == 0, done.stderr
        assert load_compiled(target).parameters()["preset"][1] == "vitl16"
        assert not (tmp_path / "gramline.yaml").exists()
    finally:
        if before is None:
            target.unlink(missing_ok=True)
        else:
            target.write_bytes(before)


@pytest.mark.parametrize("args, message", [
    (["--image", "Not An/Image:tag"], "--image 'Not An/Image:tag': is not a valid image reference"),
    (["--image", "gramline:"], "--image 'gramline:': is not a valid image reference"),
    (["--preset", "huge"], "--preset: 'huge' is not a pipeline preset"),
])
def test_bad_options_give_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    done = compile_cli(tmp_path, *args, "--output", str(tmp_path / "x.yaml"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and message in done.stderr
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.parametrize("image", ["gramline:0.1.0", "localhost:5000/a/b-c_d:v1.2", "ghcr.io/org/gramline",
                                   "gramline@sha256:" + "a" * 64, "[::1]:5000/gramline:x"])
def test_valid_image_references_are_accepted(image: str) -> None:
    from gramline.kfp.components import check_image

    assert check_image(image) == image


def test_a_stage_missing_from_the_build_drops_out_with_its_downstream(tmp_path: Path) -> None:
    """Adding a stage is a component plus a table row: without `gram` its dependants go too."""
    available = lambda name: name != "gram"
    assert [s.name for s in gp.active_stages(available)] == ["curate", "pretrain", "anchor"]
    from kfp import compiler

    out = tmp_path / "p.yaml"
    compiler.Compiler().compile(gp.build_pipeline(gp.deployment_profile("tiny"), available=available), str(out))
    spec = next(yaml.safe_load_all(out.read_text()))
    assert sorted(spec["root"]["dag"]["tasks"]) == ["anchor", "benchmark", "curate", "curate-partitions", "curate-plan",
                                                    "pretrain"]
    assert sorted(spec["root"]["dag"]["tasks"]["benchmark"]["inputs"]["artifacts"]) == ["anchor", "eval_dataset", "pretrain"]


def test_component_files_in_components_dir_are_up_to_date(tmp_path: Path) -> None:
    """components/*.yaml are generated (`python pipeline/compile.py --components components`)."""
    written = gp.compile_components(tmp_path)
    committed = sorted(p.name for p in (REPO / "components").glob("*.yaml"))
    assert committed == sorted(p.name for p in written)
    for path in written:
        assert (REPO / "components" / path.name).read_text() == path.read_text(), (
            f"components/{path.name} is stale: run python pipeline/compile.py --components components")


def test_profile_is_the_new_name_of_preset(tmp_path: Path) -> None:
    """`--profile P` compiles what `--preset P` (the older name) compiles; a bad name names the flag typed."""
    by_profile, by_preset = tmp_path / "profile.yaml", tmp_path / "preset.yaml"
    assert compile_cli(tmp_path, "--profile", "tiny", "--output", str(by_profile)).returncode == 0
    assert compile_cli(tmp_path, "--preset", "tiny", "--output", str(by_preset)).returncode == 0
    assert list(yaml.safe_load_all(by_profile.read_text())) == list(yaml.safe_load_all(by_preset.read_text()))
    done = compile_cli(tmp_path, "--profile", "huge", "--output", str(tmp_path / "x.yaml"))
    assert done.returncode == 2 and "--profile: 'huge' is not a deployment profile" in done.stderr


# --------------------------------------------------------------------------- images


def test_gpu_profiles_name_the_cuda_image_build_py_tags_under_the_registry(tmp_path: Path) -> None:
    out = tmp_path / "g.yaml"
    done = compile_cli(tmp_path, "--profile", "vits16", "--image-registry", "registry.example.com:5000/ml/",
                       "--output", str(out))
    assert done.returncode == 0, done.stderr
    tag = build_tag("--variant", "cuda", "--image-registry", "registry.example.com:5000/ml")
    assert load_compiled(out).images() == {tag}
    name, version_hash = tag.rsplit(":", 1)
    assert name == "registry.example.com:5000/ml/gramline-cuda"
    version, digest = version_hash.split("-")
    assert version == __import__("gramline").__version__ and len(digest) == 16 and int(digest, 16) >= 0


def test_image_tag_changes_with_what_goes_into_the_image(tmp_path: Path) -> None:
    """The tag's hash covers the sources, the lock file and the Dockerfiles, and nothing else."""
    from gramline.kfp.profiles import image_reference

    repo = tmp_path / "repo"
    shutil.copytree(REPO / "gramline", repo / "gramline", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "images").mkdir()
    for name in ("pyproject.toml", "constraints.txt", "README.md", "images/Dockerfile", "images/Dockerfile.cpu"):
        shutil.copy(REPO / name, repo / name)
    tags = [image_reference("cuda", repo=repo)]
    for name in ("gramline/stages/pretrain.py", "constraints.txt", "images/Dockerfile", "images/Dockerfile.cpu",
                 "pyproject.toml", "README.md"):
        with open(repo / name, "a") as fh:
            fh.write("\n# changed\n")
        tags.append(image_reference("cuda", repo=repo))
    assert len(set(tags[:-1])) == 6  # every image input changed the tag
    assert tags[-1] == tags[-2]  # the README is no part of the image
    assert image_reference("cuda", repo=repo) == tags[-1]  # same content, same tag


# --------------------------------------------------------------------------- scheduling options


def test_scheduling_options_reach_the_tasks(tmp_path: Path) -> None:
    out = tmp_path / "g.yaml"
    done = compile_cli(tmp_path, "--profile", "vitl16", "--train-gpus", "4", "--gpu-product", "NVIDIA-A100-SXM4-80GB",
                       "--memory", "400Gi", "--ephemeral-storage", "500Gi", "--node-selector", "pool=train",
                       "--node-selector", "example.com/zone=a", "--toleration", "dedicated=ml:NoSchedule",
                       "--toleration", "spot", "--queue", "team-a", "--image-pull-secret", "regcred",
                       "--output", str(out))
    assert done.returncode == 0, done.stderr
    spec, platform = [d for d in yaml.safe_load_all(out.read_text()) if d]
    executors, k8s = spec["deploymentSpec"]["executors"], platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for stage in STAGES:
        task = k8s[f"exec-{stage}"]
        container = executors[f"exec-{stage}"]["container"]
        selector = task["nodeSelector"]["labels"]
        assert {k: selector[k] for k in ("pool", "example.com/zone")} == {"pool": "train", "example.com/zone": "a"}
        assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in task["tolerations"]
        assert {"key": "spot", "operator": "Exists"} in task["tolerations"]
        assert task["podMetadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "team-a"}
        assert [s["secretName"] for s in task["imagePullSecret"]] == ["regcred"]
        scratch = [m for m in task["emptyDirMounts"] if m["mountPath"] == "/scratch"]
        resources = container["resources"]
        if stage in TRAINING:
            assert selector["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"
            assert resources["accelerator"]["resourceCount"] == "4"
            assert int(resources["resourceCpuLimit"]) == 96 // 2  # the profile's CPUs per GPU, for half the GPUs
            assert resources["resourceMemoryLimit"] == "400Gi"
            assert [m["sizeLimit"] for m in scratch] == ["500Gi"] and "medium" not in scratch[0]
            assert {"name": "TMPDIR", "value": "/scratch"} in container["env"]
        else:
            assert "nvidia.com/gpu.product" not in selector
            assert resources["accelerator"]["resourceCount"] == "1"
            assert resources["resourceMemoryLimit"] != "400Gi" and not scratch


def test_the_tiny_profile_with_gpus_for_training(tmp_path: Path) -> None:
    """--train-gpus gives a CPU profile's training tasks GPUs (any product) and leaves the others alone."""
    out = tmp_path / "g.yaml"
    assert compile_cli(tmp_path, "--profile", "tiny", "--train-gpus", "2", "--output", str(out)).returncode == 0
    pipeline = load_compiled(out)
    for stage in STAGES:
        count = pipeline.executor(stage).container.resources.accelerator.resource_count
        assert (count == "2") if stage in TRAINING else not count


def test_gpus_for_the_curate_partitions_move_the_embedding_into_them(tmp_path: Path) -> None:
    """--partition-gpus gives every curate partition task GPUs, and the compiled curate defaults make
    those tasks embed (embed.where=partitions: tests/test_curate_stage.py shows what that does)."""
    from gramline.config import load_stage_config
    from gramline.curate.config import CurateConfig
    from gramline.curate.partition import embeds_in_partitions

    out = tmp_path / "g.yaml"
    assert compile_cli(tmp_path, "--profile", "vitl16", "--partition-gpus", "1", "--output", str(out)).returncode == 0
    spec = next(d for d in yaml.safe_load_all(out.read_text()) if d)

    def gpus(spec: dict, task: str) -> str | None:
        return spec["deploymentSpec"]["executors"][f"exec-{task}"]["container"]["resources"].get(
            "accelerator", {}).get("resourceCount")

    assert [gpus(spec, task) for task in ("curate-plan", "curate-partition", "curate")] == [None, "1", "1"]
    defaults = spec["root"]["inputDefinitions"]["parameters"]["curate_overrides"]["defaultValue"]
    cfg = load_stage_config(CurateConfig, "curate", "large", None, [f"{k}={v}" for k, v in defaults.items()])
    assert embeds_in_partitions(cfg)
    plain = tmp_path / "plain.yaml"
    assert compile_cli(tmp_path, "--profile", "vitl16", "--output", str(plain)).returncode == 0
    spec = next(d for d in yaml.safe_load_all(plain.read_text()) if d)
    assert "embed.where" not in spec["root"]["inputDefinitions"]["parameters"]["curate_overrides"]["defaultValue"]
    assert gpus(spec, "curate-partition") is None


@pytest.mark.parametrize("args, message", [
    (["--train-gpus", "-1"], "--train-gpus -1: is negative"),
    (["--partition-gpus", "-1"], "--partition-gpus -1: is negative"),
    (["--memory", "lots"], "--memory 'lots': is not a Kubernetes quantity"),
    (["--ephemeral-storage", "1 TB"], "--ephemeral-storage '1 TB': is not a Kubernetes quantity"),
    (["--node-selector", "pool"], "--node-selector 'pool': is malformed"),
    (["--node-selector", "pool=a b"], "--node-selector 'pool=a b': is not a valid Kubernetes label"),
    (["--toleration", "dedicated=ml:Sometimes"], "--toleration 'dedicated=ml:Sometimes': has the effect 'Sometimes'"),
    (["--queue", "team a"], "--queue 'team a': is not a valid Kubernetes label"),
    (["--gpu-product", "H100 80GB"], "--gpu-product 'H100 80GB': is not a valid Kubernetes label"),
    (["--image-registry", "Not A Registry"], "--image-registry 'Not A Registry': is not a registry path"),
])
def test_bad_scheduling_options_give_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    done = compile_cli(tmp_path, *args, "--output", str(tmp_path / "x.yaml"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and message in done.stderr, done.stderr
    assert not (tmp_path / "x.yaml").exists()


# --------------------------------------------------------------------------- runtime preset vs compiled GPUs


@pytest.mark.parametrize("preset, gpus, warned", [
    ("vits16", 8, True),   # sized for one GPU (profile vits16), compiled with 8: another global batch
    ("vitl16", 1, True),
    ("vitl16", 0, True),   # a GPU recipe in a CPU task
    ("tiny", 8, True),     # a smoke test on the cluster: allowed, said
    ("vitl16", 8, False),
    ("vits16", 1, False),
    ("tiny", 0, False),
    ("vitb16", 4, False),  # no deployment profile sizes it: nothing to compare with
])
def test_a_stage_warns_when_the_preset_does_not_fit_its_compiled_gpus(
        capsys: pytest.CaptureFixture[str], preset: str, gpus: int, warned: bool) -> None:
    from gramline.stages.common import stage_parser

    args = stage_parser("pretrain", "x").parse_args(["--preset", preset, "--gpus", str(gpus)])
    assert args.preset == preset
    err = capsys.readouterr().err
    assert ("warning: the `preset` parameter" in err and repr(preset) in err) == warned, err


def test_with_a_pvc_curation_keeps_its_partitions_on_it(compiled: tuple[dict, dict], tmp_path: Path) -> None:
    """A retried or re-run curation skips the partitions already complete only if they outlive the pod:
    with --pvc, curate's default `partition.work_root` is a directory on the claim's mount; without
    a claim there is none (partitions live in the task's own artifacts)."""
    spec, executors = compiled
    root = spec["root"]["inputDefinitions"]["parameters"]["curate_overrides"]["defaultValue"]["partition.work_root"]
    mounts = {m["mountPath"] for m in executors["exec-curate"]["pvcMount"]}
    assert any(Path(root).is_relative_to(mount) for mount in mounts)
    out = tmp_path / "g.yaml"
    assert compile_cli(tmp_path, "--profile", "vitl16", "--image", IMAGE, "--output", str(out)).returncode == 0
    spec = next(d for d in yaml.safe_load_all(out.read_text()) if d)
    assert "partition.work_root" not in spec["root"]["inputDefinitions"]["parameters"]["curate_overrides"]["defaultValue"]
