"""A compiled training task starts one process per GPU it requests.

The pipeline is compiled by `pipeline/compile.py` for the 8-GPU `vitl16` profile (here 8 CPU
processes, gloo, with the tiny recipe); the test reads the task's GPU count back from
the YAML and runs the task's own compiled command (`gramline rerun --runner process` fills in its
placeholders with local directories, as kfp.local does). Every rank of a training stage writes its
own resumable state file (`state/step-N/rank-R.pt`), so the files counted are the processes that
trained. A single-GPU profile's task runs one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("kfp")

from gramline.data.synthetic import write_synthetic_dataset
from gramline.kfp.compiled import load_compiled

REPO = Path(__file__).resolve().parents[1]
STEPS = 2
QUICK = [f"train.steps={STEPS}", f"train.checkpoint_every={STEPS}", "train.batch_size=4", "train.log_every=1",
         "train.teacher_checkpoint_every=0", "crops.n_local=2", "heads.dino_prototypes=32",
         "heads.ibot_prototypes=32", "heads.dino_hidden=32", "heads.ibot_hidden=32"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "synth"
    write_synthetic_dataset(out, n_train=32, n_eval=8, size=64, seed=5, shard_max_count=16)
    return out


def compile_profile(out: Path, *args: str) -> Path:
    done = subprocess.run([sys.executable, str(REPO / "pipeline" / "compile.py"), *args, "--output", str(out)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out


def run_compiled_pretrain(pipeline: Path, dataset: Path, model: Path) -> subprocess.CompletedProcess:
    """The pretrain task's compiled command on this machine, with the tiny recipe."""
    return subprocess.run(
        [sys.executable, "-c", "from gramline.cli import main; main()", "rerun", "pretrain", "--runner", "process",
         "--pipeline", str(pipeline), "--param", "preset=tiny", "--input", f"dataset={dataset}",
         "--output", f"model={model}", *(a for o in QUICK for a in ("--set", o))],
        check=False, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})


def ranks_that_trained(model: Path) -> list[str]:
    return sorted(p.name for p in (model / "state" / f"step-{STEPS:08d}").glob("rank-*.pt"))


def gpu_count(pipeline: Path, stage: str) -> int:
    return int(load_compiled(pipeline).executor(stage).container.resources.accelerator.resource_count or 0)


@pytest.mark.slow  # 8 processes of a short pretrain run on 2 CPU cores
def test_the_vitl16_task_starts_one_process_per_gpu(dataset: Path, tmp_path: Path) -> None:
    """The compiled `vitl16` YAML as it ships: its 8-GPU pretrain task starts 8 processes."""
    pipeline = compile_profile(tmp_path / "vitl16.yaml", "--profile", "vitl16")
    gpus = gpu_count(pipeline, "pretrain")
    assert gpus == 8
    model = tmp_path / "model"
    done = run_compiled_pretrain(pipeline, dataset, model)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ranks_that_trained(model) == [f"rank-{r}.pt" for r in range(gpus)]
    # the tiny preset is sized for CPU tasks: rank 0 (only) says so, naming the parameter
    assert done.stderr.count("warning: the `preset` parameter 'tiny'") == 1, done.stderr[-3000:]


@pytest.mark.slow
def test_a_single_gpu_task_starts_one_process(dataset: Path, tmp_path: Path) -> None:
    pipeline = compile_profile(tmp_path / "vits16.yaml", "--profile", "vits16")
    assert gpu_count(pipeline, "pretrain") == 1
    model = tmp_path / "model"
    done = run_compiled_pretrain(pipeline, dataset, model)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ranks_that_trained(model) == ["rank-0.pt"]
