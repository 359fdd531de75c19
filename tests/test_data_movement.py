"""Data movement in the compiled pipeline: curate's shards published to S3 (`--shards-uri`) and
streamed by training, lean Model artifacts (`train.export`), and runs that start from an imported
Dataset or Model (`--from-dataset`, `--from-model STAGE=URI`, dsl.importer)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from phase_run import BATCH, one_thread, sets, tiny_run

pytest.importorskip("kfp")

REPO = Path(__file__).resolve().parents[1]
STEPS = [f"train.batch_size={BATCH}", "train.log_every=1", "train.checkpoint_every=1"]


def compile_yaml(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gramline.yaml"
    done = subprocess.run([sys.executable, str(REPO / "pipeline" / "compile.py"), "--output", str(out), *flags],
                          capture_output=True, text=True, timeout=180, check=False)
    spec = next(yaml.safe_load_all(out.read_text())) if done.returncode == 0 else {}
    return done, spec


def producer(task: dict, name: str) -> str:
    return task["inputs"]["artifacts"][name]["taskOutputArtifact"]["producerTask"]


# --------------------------------------------------------------------------- shards on S3


def test_shards_uri_is_curates_default_which_a_run_can_replace(tmp_path: Path) -> None:
    done, spec = compile_yaml(tmp_path, "--profile", "vits16", "--shards-uri", "s3://team-data/gramline/shards/")
    assert done.returncode == 0, done.stderr
    default = spec["root"]["inputDefinitions"]["parameters"]["curate_overrides"]["defaultValue"]
    assert default["output.shards_uri"] == "s3://team-data/gramline/shards"
    assert default["partition.items"] > 0  # the profile's own curate defaults stay
    # the curate task takes the pipeline parameter, so `kfp run submit ... curate_overrides=...` replaces it
    curate = spec["root"]["dag"]["tasks"]["curate"]["inputs"]["parameters"]["overrides"]
    assert curate == {"componentInputParameter": "curate_overrides"}
    (tmp_path / "plain").mkdir()
    _, plain = compile_yaml(tmp_path / "plain", "--profile", "vits16")
    assert "output.shards_uri" not in plain["root"]["inputDefinitions"]["parameters"]["curate_overrides"]["defaultValue"]


@pytest.mark.parametrize("uri", ["gs://bucket/prefix", "s3://", "s3:///prefix", "bucket/prefix"])
def test_a_bad_shards_uri_exits_2_naming_the_flag(tmp_path: Path, uri: str) -> None:
    done, _ = compile_yaml(tmp_path, "--profile", "vits16", "--shards-uri", uri)
    assert done.returncode == 2 and f"--shards-uri {uri!r}" in done.stderr
    assert not (tmp_path / "gramline.yaml").exists()


def test_a_dataset_whose_shards_are_on_s3_trains(s3_server: str, small_dataset: Path, tmp_path: Path) -> None:
    """curate's publish step (the path `output.shards_uri` takes) against moto on 127.0.0.1; the
    Dataset artifact then holds no shard, and pretrain streams them from S3."""
    import boto3

    from gramline.curate.publish import publish_to_s3
    from gramline.stages import pretrain

    bucket = f"shards-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    staged = tmp_path / "staged"
    staged.mkdir()
    for item in small_dataset.iterdir():  # the curate reports publish copies along with the shards
        (staged / item.name).symlink_to(item)
    for name in ("quarantine.parquet", "duplicates.parquet", "report.html"):
        (staged / name).write_bytes(b"")
    manifest = publish_to_s3(staged, tmp_path / "dataset", f"s3://{bucket}/gramline", tmp_path / "pending.json")
    assert all(url.startswith(f"s3://{bucket}/") for urls in manifest["shards"].values() for url in urls)
    assert not list((tmp_path / "dataset").rglob("*.tar"))  # the artifact carries no shard bytes

    out = tmp_path / "model"
    with one_thread():
        assert pretrain.main(["--dataset", str(tmp_path / "dataset"), "--out-model", str(out),
                              *sets([*STEPS, "train.steps=2", "train.teacher_checkpoints=0"])]) == 0
    model = json.loads((out / "manifest.json").read_text())
    assert model["step"] == 2 and model["inputs"][0]["path"] == str(tmp_path / "dataset")


# --------------------------------------------------------------------------- lean Model artifacts


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """pretrain → anchor → gram → highres → distill as pipeline tasks (--executor-output), 2 steps each."""
    from gramline.stages import anchor, distill, gram, highres, pretrain

    run = tiny_run(tmp_path_factory)
    root = tmp_path_factory.mktemp("chain")
    out = {name: root / name for name in ("pretrain", "anchor", "gram", "highres", "distill")}

    def task(name: str) -> list[str]:
        return ["--dataset", str(run.dataset), "--out-model", str(out[name]),
                "--executor-output", str(root / f"{name}.json")]

    with one_thread():
        assert pretrain.main([*task("pretrain"), *sets([*STEPS, "train.steps=2", "train.teacher_checkpoint_every=1"])]) == 0
        assert anchor.main(["--model", str(out["pretrain"]), *task("anchor"), *sets(["anchor.step=1"])]) == 0
        assert gram.main(["--model", str(out["pretrain"]), "--anchor", str(out["anchor"]), *task("gram"),
                          *sets([*STEPS, "phase.steps=2", "phase.refresh_at=[]", "train.teacher_checkpoint_every=1"])]) == 0
        assert highres.main(["--model", str(out["gram"]), *task("highres"),
                             *sets([*STEPS, "train.steps=2", "train.teacher_checkpoint_every=1"])]) == 0
        assert distill.main(["--teacher", str(out["highres"]), *task("distill"), *sets([*STEPS, "train.steps=2"])]) == 0
    return {**out, "dataset": run.dataset, "run": run.pretrain}


def test_pipeline_models_hold_only_what_their_consumers_read(chain: dict[str, Path]) -> None:
    # gram continued pretrain's run from its state/ and anchor chose among its teacher checkpoints: kept
    assert (chain["pretrain"] / "state").is_dir() and (chain["pretrain"] / "checkpoints").is_dir()
    assert json.loads((chain["anchor"] / "manifest.json").read_text())["step"] == 1
    assert json.loads((chain["gram"] / "manifest.json").read_text())["step"] == 4  # pretrain's 2 + its 2
    # the later stages' consumers read the weights only: no state/, no teacher checkpoints
    for stage in ("gram", "highres", "distill"):
        assert not (chain[stage] / "state").exists(), stage
        assert not (chain[stage] / "checkpoints").exists(), stage
        assert (chain[stage] / "manifest.json").is_file()
    # ... and each ran from its lean input (highres from gram's, distill from highres's)
    assert json.loads((chain["distill"] / "manifest.json").read_text())["inputs"][0]["path"] == str(chain["highres"])


@pytest.mark.parametrize(("flags", "kept"), [
    (["--executor-output", "{tmp}/out.json", "--set", "train.export.state=keep"], {"state"}),
    (["--executor-output", "{tmp}/out.json", "--set", "train.export.teacher_checkpoints=keep"], {"checkpoints"}),
    ([], {"state", "checkpoints"}),  # on its own the output is also the work area a rerun resumes from
])
def test_the_export_keys_keep_the_rest(chain: dict[str, Path], tmp_path: Path, flags: list[str],
                                       kept: set[str]) -> None:
    from gramline.stages import highres

    out = tmp_path / "highres"
    with one_thread():
        assert highres.main(["--model", str(chain["gram"]), "--dataset", str(chain["dataset"]), "--out-model", str(out),
                             *sets([*STEPS, "train.steps=2", "train.teacher_checkpoint_every=1"]),
                             *[f.format(tmp=tmp_path) for f in flags]]) == 0
    assert {name for name in ("state", "checkpoints") if (out / name).is_dir()} == kept


def test_an_interrupted_pipeline_task_keeps_its_state_to_resume(chain: dict[str, Path], tmp_path: Path) -> None:
    from gramline.stages import highres

    class Interrupt(Exception):
        pass

    def crash(recipe: object, step: int) -> None:
        if step == 2:
            raise Interrupt

    out = tmp_path / "highres"
    argv = ["--model", str(chain["gram"]), "--dataset", str(chain["dataset"]), "--out-model", str(out),
            "--executor-output", str(tmp_path / "out.json"), *sets([*STEPS, "train.steps=3"])]
    with one_thread():
        with pytest.raises(Interrupt):
            highres.main(argv, hooks=[crash])
        assert (out / "state").is_dir()
        assert highres.main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed"] and manifest["step"] == 3 and not (out / "state").exists()


# --------------------------------------------------------------------------- importers


def test_from_dataset_and_from_model_compile_to_importers(tmp_path: Path) -> None:
    done, spec = compile_yaml(tmp_path, "--profile", "vits16", "--from-dataset", "s3://team/datasets/v3",
                              "--from-model", "highres=s3://team/models/highres-7")
    assert done.returncode == 0, done.stderr
    tasks = spec["root"]["dag"]["tasks"]
    importers = {t["taskInfo"]["name"]: name for name, t in tasks.items() if name.startswith("importer")}
    assert set(importers) == {"curate-import", "highres-import"}
    executors = spec["deploymentSpec"]["executors"]
    uri = {shown: executors[spec["components"][tasks[name]["componentRef"]["name"]]["executorLabel"]]["importer"]
           for shown, name in importers.items()}
    assert uri["curate-import"]["artifactUri"]["constant"] == "s3://team/datasets/v3"
    assert uri["curate-import"]["typeSchema"]["schemaTitle"] == "system.Dataset"
    assert uri["highres-import"]["artifactUri"]["constant"] == "s3://team/models/highres-7"
    assert uri["highres-import"]["typeSchema"]["schemaTitle"] == "system.Model"
    # the stages that only fed highres are left out; the rest of the DAG is unchanged
    assert not {"curate", "curate-plan", "pretrain", "anchor", "gram", "highres"} & set(tasks)
    assert producer(tasks["distill"], "teacher") == importers["highres-import"]
    for task in ("distill", "align"):
        assert producer(tasks[task], "dataset") == importers["curate-import"]
    assert producer(tasks["align"], "backbone") == "distill"
    bench = tasks["benchmark"]
    assert producer(bench, "highres") == importers["highres-import"] and producer(bench, "distill") == "distill"
    assert producer(bench, "eval_dataset") == importers["curate-import"]
    assert "pretrain_overrides" not in spec["root"]["inputDefinitions"]["parameters"]


def test_importing_anchor_keeps_pretrain_which_gram_still_continues(tmp_path: Path) -> None:
    done, spec = compile_yaml(tmp_path, "--profile", "tiny", "--from-model", "anchor=s3://team/anchor")
    assert done.returncode == 0, done.stderr
    tasks = spec["root"]["dag"]["tasks"]
    assert "pretrain" in tasks and "anchor" not in tasks
    assert producer(tasks["gram"], "pretrained") == "pretrain" and producer(tasks["gram"], "anchor") != "pretrain"


@pytest.mark.parametrize(("flags", "named"), [
    (["--from-model", "curate=s3://b/x"], "--from-model 'curate=s3://b/x'"),
    (["--from-model", "nope=s3://b/x"], "--from-model nope="),
    (["--from-model", "highres"], "--from-model 'highres'"),
    (["--from-dataset", "relative/dir"], "--from-dataset 'relative/dir'"),
    (["--from-dataset", "s3://b/d", "--shards-uri", "s3://b/s"], "--shards-uri"),
])
def test_bad_import_options_exit_2_naming_the_flag(tmp_path: Path, flags: list[str], named: str) -> None:
    done, _ = compile_yaml(tmp_path, "--profile", "tiny", *flags)
    assert done.returncode == 2 and named in done.stderr, done.stderr
    assert not (tmp_path / "gramline.yaml").exists()


def test_a_run_from_an_imported_dataset_and_model_in_process_mode(chain: dict[str, Path], tmp_path: Path) -> None:
    """kfp.local runs dsl.importer (local/importer_handler.py): the tiny DAG from the chain's distill
    Model and Dataset runs align and benchmark only."""
    done, _ = compile_yaml(tmp_path, "--profile", "tiny", "--from-dataset", str(chain["dataset"]),
                           "--from-model", f"distill={chain['distill']}")
    assert done.returncode == 0, done.stderr
    root = tmp_path / "runs"
    ran = subprocess.run([sys.executable, "-c", "from gramline.cli import main; main()", "run", "--pipeline",
                          str(tmp_path / "gramline.yaml"), "--runner", "process", "--root", str(root)],
                         capture_output=True, text=True, timeout=1200, check=False)
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-3000:]
    run_dir = next(p for p in root.iterdir() if p.is_dir())
    tasks = {p.name for p in run_dir.iterdir() if (p / "executor_output.json").is_file()}
    assert tasks == {"align", "benchmark"}
    align = json.loads((run_dir / "align" / "model" / "manifest.json").read_text())
    assert {e["name"]: e["path"] for e in align["inputs"]}["dataset"] == str(chain["dataset"])
    metrics = json.loads((run_dir / "benchmark" / "executor_output.json").read_text())
    assert "metrics" in metrics["artifacts"]
