"""FSDP2 is on the same footing as DDP: on 2 gloo ranks the tiny DINO recipe (with a Gram teacher)
trains to the same losses and weights under FSDP2, under DDP and on 1 process over the same global
batch, and a checkpoint written under FSDP2 resumes exactly under DDP and on 1 process; the gram
phase (a Gram teacher refreshed from the EMA teacher, or the EMA teacher itself as the anchor)
gives the losses of 1 process too.

Tolerances (float32; the runs differ only in the order of sums: gradient all-reduce, reduce-scatter
or one batch): losses within 1e-5 absolute (about 1e-6 relative on losses of ~10; measured 2e-6);
weights within 1e-6 after 3 AdamW steps that each move them by up to 2.6e-4 (measured 1.2e-7); the
AdamW moments within 1e-4 of each tensor's largest value (measured 3e-6). The moments carry the
gradients' scale, which AdamW's update hides: with clipping active at every step they show that the
norm is taken over all shards (a per-shard norm would scale them by about 1.4).
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from gramline.data.collate import CropBatch
from gramline.models.archs import ARCHS
from gramline.models.backbone import Backbone
from gramline.train.checkpoint import read_model_state
from gramline.train.distributed import DistEnv
from gramline.train.loop import LoopSettings, TrainLoop
from gramline.train.recipes.dino.config import (
    DinoConfig,
    GramStageConfig,
    load_gram_config,
    load_pretrain_config,
)
from gramline.train.recipes.dino.recipe import DinoRecipe

WORLD = 2
GLOBAL_BATCH = 4
STEPS = 3
LOSS_ATOL, WEIGHT_ATOL, MOMENT_RTOL = 1e-5, 1e-6, 1e-4
PARTS = ("student", "teacher", "optimizer", "gram_teacher")


def config(world: int, **train: Any) -> DinoConfig:
    sets = {"train.batch_size": GLOBAL_BATCH // world, "train.steps": STEPS, "train.checkpoint_every": 2,
            "train.teacher_checkpoint_every": 0, "heads.dino_prototypes": 32, "heads.ibot_prototypes": 32,
            "heads.dino_hidden": 32, "heads.ibot_hidden": 32, "heads.dino_bottleneck": 16,
            "heads.ibot_bottleneck": 16, "crops.n_local": 2, "crops.gram_size": 48, "gram.enabled": True,
            "gram.weight.start": 1.0, "gram.weight.peak": 1.0, "gram.weight.end": 1.0,
            "loss.koleo_group_size": 2,  # KoLeo in pairs over the global batch: one process matches 2 ranks
            "optim.lr.start": 1e-3, "optim.lr.peak": 1e-3, "optim.lr.end": 1e-3, "optim.lr.warmup_steps": 0,
            "optim.clip_grad": 0.01,  # small enough that every step clips: the norm must span all shards
            **{f"train.{k}": v for k, v in train.items()}}
    return load_pretrain_config("tiny", overrides=[f"{k}={v}" for k, v in sets.items()])


def global_batch(step: int, cfg: DinoConfig) -> CropBatch:
    gen = torch.Generator().manual_seed(1000 + step)
    n, side, local = GLOBAL_BATCH, cfg.crops.global_size, cfg.crops.local_size
    grid = (side // ARCHS[cfg.backbone.arch].patch_size) ** 2
    gram = cfg.crops.gram_size or side
    return CropBatch(torch.randn(2 * n, 3, side, side, generator=gen),
                     torch.randn(cfg.crops.n_local * n, 3, local, local, generator=gen),
                     torch.randn(2 * n, 3, gram, gram, generator=gen), torch.rand(2 * n, grid, generator=gen) < 0.3, n)


def rank_slice(batch: CropBatch, rank: int, world: int) -> CropBatch:
    """This rank's images of a crop-major batch (rank r holds images r*b .. (r+1)*b - 1 of every crop)."""
    b = batch.batch_size // world

    def part(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([crop[rank * b:(rank + 1) * b] for crop in t.split(batch.batch_size)])

    return CropBatch(part(batch.global_crops), part(batch.local_crops), part(batch.gram_crops), part(batch.masks), b)


def gram_config(world: int, refresh: bool, **train: Any) -> GramStageConfig:
    """The gram phase continuing `config(world)`: refreshed from the EMA teacher after its first step
    (`refresh`), or anchored to the live EMA teacher itself."""
    sets = {"phase.steps": STEPS, "phase.ramp_steps": 1, "phase.ema_teacher": not refresh,
            "phase.refresh_at": "[1]" if refresh else "[]", "loss.koleo_group_size": 2,
            "train.batch_size": GLOBAL_BATCH // world, "train.teacher_checkpoint_every": 0,
            **{f"train.{k}": v for k, v in train.items()}}
    return load_gram_config("tiny", None, [f"{k}={v}" for k, v in sets.items()],
                            config(world).model_dump(mode="json"))


def run(out: Path, env: DistEnv, cfg: DinoConfig, resume_from: Path | None = None, stage: str = "pretrain",
        anchor: bool = True) -> dict[str, Any]:
    """Train (or resume from the checkpoint `resume_from`, copied in) to STEPS; returns the per-step
    logs, what the parts held right after the resume, and how the modules are laid out. `anchor`:
    with a frozen Gram teacher."""
    if resume_from is not None:
        if env.rank == 0:
            shutil.copytree(resume_from, out / "state" / resume_from.name)
        if env.enabled:
            dist.barrier()
    torch.manual_seed(7)
    gram_anchor = Backbone(cfg.backbone) if anchor else None  # the same Gram teacher on every rank and run
    recipe = DinoRecipe(cfg, stage, gram_anchor=gram_anchor, log=False)

    def batches(start: int) -> Iterator[CropBatch]:
        for step in range(start, STEPS):
            yield rank_slice(global_batch(step, cfg), env.rank, env.world_size)

    loop = TrainLoop(recipe, batches, env, out, LoopSettings.of(cfg.train), GLOBAL_BATCH, log=False)
    modules = {"student": recipe.student, "teacher": recipe.teacher.model}
    if recipe.gram_teacher is not None:
        modules["gram_teacher"] = recipe.gram_teacher.module
    layout = {name: [(p.to_local().numel() if hasattr(p, "to_local") else -1, p.numel()) for p in module.parameters()]
              for name, module in modules.items()}
    loaded = None
    if resume_from is not None:
        assert loop.resume()
        loaded = copy.deepcopy({name: part.state_dict() for name, part in recipe.parts().items()})
    logs: list[dict[str, float]] = []
    loop.callbacks.append(lambda step: logs.append(dict(loop.last_log)))
    loop.run()
    gram_after_forward = [hasattr(p, "to_local") for p in modules.get("gram_teacher", recipe.student).parameters()]
    (out / "export").mkdir(exist_ok=True)
    recipe.export(out / "export", loop.step, {}, {"inputs": []})  # every rank: FSDP2 gathers the teacher
    return {"logs": logs, "layout": layout, "loaded": loaded, "gram_resharded": gram_after_forward}


def _worker(rank: int, init_file: str, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    env = DistEnv(rank, WORLD, rank, torch.device("cpu"))
    base = Path(root)
    try:
        results = {
            # selective activation checkpointing under FSDP2: the same maths, composed with sharding
            "fsdp": run(base / "fsdp", env, config(WORLD, distributed="fsdp", activation_checkpointing="selective")),
            "ddp": run(base / "ddp", env, config(WORLD, distributed="ddp")),
        }
        fsdp_step2 = base / "fsdp" / "state" / "step-00000002"
        results["ddp_from_fsdp"] = run(base / "ddp_from_fsdp", env, config(WORLD, distributed="ddp"), fsdp_step2)
        torch.save(results, base / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def mean_logs(per_rank: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    keys = ("total", "dino_local", "dino_global", "ibot", "koleo", "gram")
    return [{k: sum(r[i][k] for r in per_rank) / len(per_rank) for k in keys} for i in range(len(per_rank[0]))]


def assert_close_states(got: dict, want: dict, what: str) -> None:
    """Weights of the student and both teachers within WEIGHT_ATOL, AdamW moments within MOMENT_RTOL."""
    for part in ("student", "teacher", "gram_teacher"):
        a, b = got[part], want[part]
        a, b = (a["weights"], b["weights"]) if part == "gram_teacher" else (a, b)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], atol=WEIGHT_ATOL, rtol=0), f"{what}: {part}.{key}"
    a, b = got["optimizer"]["state"], want["optimizer"]["state"]
    assert a.keys() == b.keys()
    for name in b:
        for key in ("exp_avg", "exp_avg_sq"):
            scale = b[name][key].abs().max()
            assert torch.allclose(a[name][key], b[name][key], atol=float(MOMENT_RTOL * scale), rtol=0), \
                f"{what}: optimizer {name} {key}"


def assert_equal_trees(got: Any, want: Any, where: str) -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for key in want:
            assert_equal_trees(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_equal_trees(a, b, f"{where}[{i}]")
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got, want), where
    else:
        assert got == want, where


def test_fsdp_equals_ddp_and_one_process_and_its_checkpoints_move_between_them(tmp_path: Path) -> None:
    one_env = DistEnv(0, 1, 0, torch.device("cpu"))
    one = run(tmp_path / "one", one_env, config(1))
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    final = lambda run_dir: read_model_state(tmp_path / run_dir / "state" / f"step-{STEPS:08d}")

    # sharded for real: every parameter of the student, its EMA teacher and the Gram teacher is split
    # over the 2 ranks (each holds about half), and the inference-only Gram teacher is resharded
    for name in ("student", "teacher", "gram_teacher"):
        local = [sum(n for n, _ in r["fsdp"]["layout"][name]) for r in ranks]
        full = sum(n for _, n in ranks[0]["fsdp"]["layout"][name])
        assert min(local) > 0 and sum(local) == full and max(local) <= full * 0.55, (name, local, full)
        assert all(n == -1 for r in ranks for n, _ in r["ddp"]["layout"][name])  # DDP: plain tensors
    assert all(all(r["fsdp"]["gram_resharded"]) for r in ranks)

    # the exported teacher (timm layout, gathered from the shards) is the one-process run's
    for name in ("backbone.safetensors", "heads.safetensors"):
        got, want = load_file(str(tmp_path / "fsdp" / "export" / name)), load_file(str(tmp_path / "one" / "export" / name))
        assert got.keys() == want.keys()
        assert all(torch.allclose(got[k], want[k], atol=WEIGHT_ATOL, rtol=0) for k in want), name

    # the same losses and final weights: FSDP2 (2 ranks) = DDP (2 ranks) = 1 process
    for mode in ("fsdp", "ddp"):
        got = mean_logs([r[mode]["logs"] for r in ranks])
        for step, (a, b) in enumerate(zip(got, one["logs"])):
            for key in a:
                assert a[key] == pytest.approx(b[key], abs=LOSS_ATOL), f"{mode} step {step + 1} {key}"
        assert_close_states(final(mode), final("one"), mode)

    # a checkpoint written under FSDP2 loads exactly under DDP and on one process, and training on
    # from it matches the uninterrupted FSDP2 run
    fsdp_step2 = read_model_state(tmp_path / "fsdp" / "state" / "step-00000002")
    one_from_fsdp = run(tmp_path / "one_from_fsdp", one_env, config(1), tmp_path / "fsdp" / "state" / "step-00000002")
    for loaded, what in ((ranks[0]["ddp_from_fsdp"]["loaded"], "ddp<-fsdp"), (one_from_fsdp["loaded"], "one<-fsdp")):
        assert_equal_trees({p: loaded[p] for p in PARTS}, {p: fsdp_step2[p] for p in PARTS}, what)
    for run_dir in ("ddp_from_fsdp", "one_from_fsdp"):
        assert_close_states(final(run_dir), final("fsdp"), run_dir)


def _gram_worker(rank: int, init_file: str, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    env = DistEnv(rank, WORLD, rank, torch.device("cpu"))
    try:
        logs = {refresh: run(Path(root) / f"fsdp-{refresh}", env, gram_config(WORLD, refresh, distributed="fsdp"),
                             stage="gram", anchor=refresh)["logs"] for refresh in (True, False)}
        torch.save(logs, Path(root) / f"gram-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gram_phase_under_fsdp_refreshes_and_anchors_to_the_ema_teacher_as_one_process(tmp_path: Path) -> None:
    """The Gram teacher refreshed from the sharded EMA teacher (a shard-by-shard copy), and the EMA
    teacher's own backbone as the anchor (an FSDP2 unit called through `forward_group`)."""
    one_env = DistEnv(0, 1, 0, torch.device("cpu"))
    one = {refresh: run(tmp_path / f"one-{refresh}", one_env, gram_config(1, refresh), stage="gram",
                        anchor=refresh)["logs"] for refresh in (True, False)}
    mp.spawn(_gram_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"gram-rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for refresh in (True, False):
        got = mean_logs([r[refresh] for r in ranks])
        assert all(step["gram"] > 0 for step in got)
        for step, (a, b) in enumerate(zip(got, one[refresh])):
            for key in a:
                assert a[key] == pytest.approx(b[key], abs=LOSS_ATOL), f"refresh={refresh} step {step + 1} {key}"
