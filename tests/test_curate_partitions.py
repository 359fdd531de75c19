"""Partitioned curation: the plan → ParallelFor(partition) → Collected reduce DAG in kfp.local's
process mode gives the same dataset as the single-task stage; complete partitions are skipped on a
re-run; bad partition settings and incomplete partition sets are rejected naming what is wrong."""

# no `from __future__ import annotations`: KFP reads the pipeline's real annotation objects

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_curate_dedup import make_copy, scene

from gramline.config import load_stage_config
from gramline.curate import pipeline as cp
from gramline.curate.config import CurateConfig
from gramline.errors import InputError
from gramline.stages import curate as stage
from gramline.stages import curate_partition

SETTINGS = {"ingest.chunk_size": 7, "ingest.workers": 1, "split.eval_fraction": 0.25, "balance.target": 0.8}


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _collection(root: Path) -> Path:
    """A folder of 30 originals, 4 exact copies (BMP), 6 near copies (JPEG) and 3 corrupt files."""
    rng = np.random.default_rng(7)
    folder = root / "collection"
    folder.mkdir()
    originals = [scene(rng, int(rng.integers(90, 140)), int(rng.integers(90, 140))) for _ in range(30)]
    for i, image in enumerate(originals):
        (folder / f"o{i:03d}.png").write_bytes(_png(image))
    for n in range(4):
        (folder / f"e{n:03d}.bmp").write_bytes(_png(originals[5 * n + 1], "BMP"))
    for n in range(6):
        (folder / f"n{n:03d}.jpg").write_bytes(_png(make_copy(rng, originals[4 * n + 2], "resize"), "JPEG"))
    (folder / "t-truncated.png").write_bytes(_png(originals[0])[:60])
    (folder / "t-text.png").write_bytes(b"not an image at all")
    (folder / "t-empty.jpg").write_bytes(b"")
    return folder


def _tar_with_repeats(root: Path) -> Path:
    """A tar whose member `dup.png` appears twice (two items, two keys)."""
    rng = np.random.default_rng(3)
    path = root / "repeats.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("a.png", "dup.png", "b.png", "dup.png", "c.png"):
            data = _png(scene(rng, 80, 80))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _tables(out: Path) -> dict[str, list[dict]]:
    return {name: pq.read_table(out / f"{name}.parquet").to_pylist()
            for name in ("index", "duplicates", "quarantine")}


def _single_task(sources: list[str], out: Path, **settings) -> dict[str, list[dict]]:
    argv = [a for s in sources for a in ("--source", s)] + ["--out-dataset", str(out)]
    for key, value in {**SETTINGS, **settings}.items():
        argv += ["--set", f"{key}={value}"]
    assert stage.main(argv) == 0
    return _tables(out)


def _check_same(partitioned: dict[str, list[dict]], single: dict[str, list[dict]]) -> None:
    assert partitioned == single
    kinds = {row["kind"] for row in single["duplicates"]}
    assert {"exact", "near"} <= kinds
    assert len(single["quarantine"]) == 3
    assert {row["split"] for row in single["index"]} == {"train", "eval"}


def compile_curate_only(yaml_path: Path) -> Path:
    """The plan → ParallelFor of partitions → Collected reduce DAG alone (parameters `source`,
    `overrides`), compiled to `yaml_path` with the tiny profile's components."""
    pytest.importorskip("kfp")
    from kfp import compiler, dsl

    from gramline.kfp.components import build_components
    from gramline.kfp.pipeline import curate_fan_out
    from gramline.kfp.profiles import deployment_profile

    components = build_components()
    fan_out = curate_fan_out(components["curate_partition"], deployment_profile("tiny"))

    @dsl.pipeline(name="curate-only")
    def curate_only(source: str, overrides: dict) -> None:
        plan = components["curate_plan"](source=source, preset="tiny", overrides=overrides)
        parts = fan_out(source=source, partitions=plan.outputs["partitions"], preset="tiny", overrides=overrides)
        components["curate"](source=source, parts=parts.output, preset="tiny", overrides=overrides)

    compiler.Compiler().compile(curate_only, str(yaml_path))
    return yaml_path


def run_curate_dag(source: str, overrides: dict, tmp_path: Path) -> Path:
    """The curate-only DAG (compile_curate_only) run by kfp.local with the host-process runner; the
    run's directory."""
    from kfp import local
    from kfp.local import pipeline_orchestrator

    from gramline.kfp.compiled import load_compiled
    from gramline.kfp.local_run import host_subprocess_runner, quiet_kfp_local_warnings

    yaml_path = compile_curate_only(tmp_path / "curate.yaml")
    runs = tmp_path / "runs"
    quiet_kfp_local_warnings()
    with host_subprocess_runner() as runner:
        local.init(runner=runner, pipeline_root=str(runs), raise_on_error=True)
        pipeline_orchestrator.run_local_pipeline(load_compiled(yaml_path).spec,
                                                 {"source": source, "overrides": overrides})
    return next(runs.iterdir())


def test_partitioned_dag_in_kfp_local_matches_the_single_task(tmp_path: Path) -> None:
    folder = _collection(tmp_path)
    run_dir = run_curate_dag(str(folder), {**SETTINGS, "partition.count": 3}, tmp_path)
    part_dirs = sorted(run_dir.glob("for-loop-*-iteration-*/curate-partition/part"))
    assert len(part_dirs) == 3 and all((p / "manifest.json").is_file() for p in part_dirs)
    ranges = sorted((m["start"], m["stop"]) for m in (json.loads((p / "manifest.json").read_text()) for p in part_dirs))
    assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(ranges)) and ranges[-1][1] == 43

    single = _single_task([str(folder)], tmp_path / "single")
    _check_same(_tables(run_dir / "curate" / "dataset"), single)


def reduce_backwards(sources: list[str], overrides: list[str], work: Path, out: Path) -> tuple[cp.Plan, list[Path]]:
    """The plan's partitions ingested last to first into `work`, then the reduce stage on them into
    `out`; the plan and the partition directories."""
    cfg = load_stage_config(CurateConfig, "curate", "tiny", None, overrides)
    plan = cp.plan(sources, cfg)
    roots = []
    for partition in reversed(plan.partitions):
        roots.append(work / f"part{partition.index}")
        cp.run_partition(sources, cfg, partition, roots[-1])
    argv = [a for s in sources for a in ("--source", s)] + ["--out-dataset", str(out), "--partition-outputs",
                                                             *map(str, roots)]
    assert stage.main(argv + [x for o in overrides for x in ("--set", o)]) == 0
    return plan, roots


def test_partitions_reduced_out_of_order_match_across_sources_with_repeated_tar_members(tmp_path: Path) -> None:
    """Cuts inside the folder and inside the tar (whose repeated member must keep two keys) give the
    same dataset as one pass."""
    sources = [str(_collection(tmp_path)), str(_tar_with_repeats(tmp_path))]
    plan, _ = reduce_backwards(sources, [f"{k}={v}" for k, v in SETTINGS.items()] + ["partition.items=11"],
                               tmp_path, tmp_path / "reduced")
    assert len(plan.partitions) == 5 and plan.total == 48  # the last one holds the tar's last 4 items
    single = _single_task(sources, tmp_path / "single")
    _check_same(_tables(tmp_path / "reduced"), single)
    keys = [row["key"] for row in single["index"]]
    assert len(keys) == len(set(keys))


def test_rerun_skips_a_complete_partition(tmp_path: Path, capsys) -> None:
    folder = str(_collection(tmp_path))
    work_root = tmp_path / "work"
    overrides = {**SETTINGS, "partition.count": 2, "partition.work_root": str(work_root)}
    cfg = load_stage_config(CurateConfig, "curate", "tiny", None, [f"{k}={v}" for k, v in overrides.items()])
    first, second = cp.plan([folder], cfg).partitions

    def run(partition, out: Path) -> dict:
        argv = ["--source", folder, "--partition", json.dumps(partition.to_json()), "--out-part", str(out),
                "--executor-output", str(out.parent / f"{out.name}.json"), "--overrides", json.dumps(overrides)]
        assert curate_partition.main(argv) == 0
        return json.loads((out.parent / f"{out.name}.json").read_text())["artifacts"]["part"]["artifacts"][0]

    assert run(first, tmp_path / "run1-p0")["metadata"]["skipped"] is False  # the first run stopped after it
    stored = sorted(p for p in work_root.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in stored}
    capsys.readouterr()
    assert run(first, tmp_path / "run2-p0")["metadata"]["skipped"] is True
    assert "partition 0 already complete" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in stored} == stamps  # not rewritten
    assert run(second, tmp_path / "run2-p1")["metadata"]["skipped"] is False
    # the plan's directory in the work root stands for its partitions (`gramline rerun curate --input parts=DIR`)
    reduced = cp.reduce([folder], cfg, [work_root / f"plan-{first.plan_id}"], tmp_path / "out")
    single = _single_task([folder], tmp_path / "single")
    assert _tables(tmp_path / "out") == single and reduced["splits"]["eval"] > 0
    assert not work_root.joinpath(f"plan-{first.plan_id}").exists()  # removed after success


def test_single_task_rerun_skips_complete_partitions(tmp_path: Path, capsys) -> None:
    folder = str(_collection(tmp_path))
    out = tmp_path / "out"
    _single_task([folder], out, **{"partition.count": 3, "output.keep_work": "true"})
    capsys.readouterr()
    (out / "manifest.json").unlink()
    _single_task([folder], out, **{"partition.count": 3, "output.keep_work": "true"})
    err = capsys.readouterr().err
    assert "3 of 3 partition(s) were complete already" in err and "ingest+validate" not in err


@pytest.mark.parametrize("setting, key", [
    ("partition.items=-5", "partition.items"),
    ("partition.count=0", "partition.count"),
    ("partition.items=10 partition.count=4", "partition.items"),
    ("partition.work_root=s3://bucket/work", "partition.work_root"),
])
def test_bad_partition_config_is_an_input_error_naming_the_key(setting: str, key: str, tmp_path: Path,
                                                               capsys) -> None:
    with pytest.raises(InputError, match=key.replace(".", r"\.")):
        load_stage_config(CurateConfig, "curate", "tiny", None, setting.split())
    argv = ["--source", "synthetic:n=5", "--out-dataset", str(tmp_path / "o")]
    for item in setting.split():
        argv += ["--set", item]
    with pytest.raises(SystemExit) as exit_info:
        stage.main_cli(argv)
    assert exit_info.value.code == 2 and key in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_reduce_rejects_a_missing_or_incomplete_partition(tmp_path: Path) -> None:
    source = ["synthetic:n=30,size=32,seed=1"]
    cfg = load_stage_config(CurateConfig, "curate", "tiny", None, ["partition.count=3", "ingest.workers=1"])
    parts = cp.plan(source, cfg).partitions
    roots = [tmp_path / f"p{p.index}" for p in parts]
    for partition, root in zip(parts, roots):
        cp.run_partition(source, cfg, partition, root)
    with pytest.raises(InputError, match=r"items \[10, 20\) of plan .* uncovered"):
        cp.reduce(source, cfg, [roots[0], roots[2]], tmp_path / "out")
    (roots[1] / "manifest.json").unlink()
    with pytest.raises(InputError, match="incomplete"):
        cp.reduce(source, cfg, roots, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_collection_too_large_for_its_partition_size_gets_fewer_larger_partitions(capsys) -> None:
    cfg = load_stage_config(CurateConfig, "curate", "tiny", None, ["partition.items=10", "partition.max_count=4"])
    plan = cp.plan(["synthetic:n=101,size=32,seed=1"], cfg)
    assert [(p.start, p.stop) for p in plan.partitions] == [(0, 26), (26, 52), (52, 78), (78, 101)]
    assert "cut into 4 of 26 items" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"partition\.count=5 is above partition\.max_count=4"):
        load_stage_config(CurateConfig, "curate", "tiny", None, ["partition.count=5", "partition.max_count=4"])


def _executor_input(n_parts: int) -> str:
    """A KFP executor input whose list input `parts` holds `n_parts` partition artifacts, in the compact
    JSON the KFP launcher writes, with cluster-length URIs (pipeline root, run and task ids)."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    executor_input = pipeline_spec_pb2.ExecutorInput()
    parts = executor_input.inputs.artifacts["parts"]
    for i in range(n_parts):
        artifact = parts.artifacts.add()
        artifact.name = f"projects/gramline/locations/default/metadataStores/default/artifacts/{10**9 + i}"
        artifact.type.schema_title, artifact.type.schema_version = "system.Artifact", "0.0.1"
        artifact.uri = (f"s3://team-a-mlpipeline/v2/artifacts/gramline-vitl16/0b7f3c52-5f1e-4a8e-9a9e-3b1c2d4e5f60/"
                        f"curate-partition/{i:08d}-5f1e-4a8e-9a9e-3b1c2d4e5f60/part")
        json_format.ParseDict({"index": i, "start": i * 500_000, "stop": (i + 1) * 500_000, "chunks": 123,
                               "plan_id": "0123456789abcdef", "skipped": False, "display_name": "part"},
                              artifact.metadata)
    return json.dumps(json_format.MessageToDict(executor_input), separators=(",", ":"))


def test_the_largest_fan_out_allowed_fits_the_reduce_tasks_one_argument() -> None:
    """The reduce reads the partition list from its executor input, one command-line argument, which
    Linux caps at 128 KiB: at partition.max_count partitions it still starts (and reads them all),
    and twice as many would not start at all."""
    import subprocess
    import sys

    largest = CurateConfig().partition.max_count
    read = ("import sys; from gramline.stages.curate import collected_paths; "
            "print(len(collected_paths(sys.argv[1])))")
    done = subprocess.run([sys.executable, "-c", read, _executor_input(largest)], check=True,
                          capture_output=True, text=True, timeout=120)
    assert int(done.stdout) == largest
    with pytest.raises(OSError, match="Argument list too long"):
        subprocess.run([sys.executable, "-c", "pass", _executor_input(2 * largest)], check=False, timeout=120)
