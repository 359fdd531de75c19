"""Distillation step time: the teacher's share, each student's, and one shared step for N students
against N separate single-student runs (the saving the shared teacher forward exists for).

    python bench/distill_step.py                          # CPU: the tiny preset (tiny teacher, 2 students)
    python bench/distill_step.py --device cuda --preset vitl16 --teacher-arch vitl16   # bf16 on a GPU

Model time only, on one fixed batch of the real multi-crop pipeline, after warm-up steps; sections
are timed by the training runtime's `section` hooks (synchronised on CUDA). The shared and the
single-student runs are timed in interleaved rounds and their medians compared. The teacher has
random weights: its values do not change the time. All figures come from the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gramline.data.collate import CropBatch
from gramline.data.reader import open_dataset
from gramline.data.synthetic import write_synthetic_dataset
from gramline.models.archs import ARCHS
from gramline.models.config import BackboneConfig, HeadsConfig
from gramline.presets import stage_preset
from gramline.train.data import batch_source
from gramline.train.distributed import DistEnv
from gramline.train.loop import LoopSettings, TrainLoop
from gramline.train.recipes.dino.model import DinoModel
from gramline.train.recipes.distill.config import DistillConfig, check_heads, load_distill_config
from gramline.train.recipes.distill.recipe import DistillRecipe


def make_loop(config: DistillConfig, teacher: DinoModel, device: torch.device, out: Path) -> TrainLoop:
    heads = check_heads(config, teacher_heads(config), "bench")
    recipe = DistillRecipe(config, teacher, heads, log=False)
    return TrainLoop(recipe, lambda step: iter(()), DistEnv(0, 1, 0, device), out, LoopSettings.of(config.train),
                     images_per_step=config.train.batch_size, log=False)


def teacher_heads(config: DistillConfig) -> HeadsConfig:
    """The teacher's head sizes: the pretrain preset's of the same name."""
    return HeadsConfig(**stage_preset("pretrain", config.preset).get("heads", {}))


def time_steps(loop: TrainLoop, batch: CropBatch, steps: int, warmup: int) -> tuple[float, dict[str, float]]:
    for _ in range(warmup):
        loop.train_step(batch)
    loop.runtime.section_times = {}
    sync = torch.cuda.synchronize if loop.runtime.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        loop.train_step(batch)
    sync()
    per_step = (time.perf_counter() - start) / steps
    sections = {k: v / steps for k, v in loop.runtime.section_times.items()}
    loop.runtime.section_times = None
    return per_step, sections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default="tiny", help="distill preset (its students)")
    parser.add_argument("--teacher-arch", default="tiny")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    overrides = ["train.compile=false", "data.num_workers=0"] + ([f"train.batch_size={args.batch}"] if args.batch else [])
    config = load_distill_config(args.preset, None, overrides)
    size = 64 if ARCHS[args.teacher_arch].patch_size == 8 else 256
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_synthetic_dataset(data, n_train=max(64, 2 * config.train.batch_size), n_eval=8, size=size, seed=0)
        batch = next(batch_source(open_dataset(data), config, DistEnv(0, 1, 0, torch.device("cpu")))(0))
        torch.manual_seed(0)
        teacher = DinoModel(BackboneConfig(arch=args.teacher_arch, img_size=config.crops.global_size),
                            teacher_heads(config))
        loops = {"shared": make_loop(config, teacher, device, Path(tmp) / "shared")}
        for name in config.distill.students:
            alone = config.model_copy(update={"distill": config.distill.model_copy(
                update={"students": {name: config.distill.students[name]}})})
            loops[name] = make_loop(alone, teacher, device, Path(tmp) / name)
        times: dict[str, list[float]] = {key: [] for key in loops}
        sections: dict[str, list[dict[str, float]]] = {key: [] for key in loops}
        for _ in range(args.rounds):  # interleaved, so that drifts of the machine hit every variant alike
            for key, loop in loops.items():
                step_s, parts = time_steps(loop, batch, args.steps, args.warmup)
                times[key].append(step_s)
                sections[key].append(parts)
    median = {key: statistics.median(values) for key, values in times.items()}
    shared_s = median.pop("shared")
    separate = median
    shared = {k: statistics.median(p[k] for p in sections["shared"]) for k in sections["shared"][0]}
    students = {name: sum(v for k, v in shared.items() if k.endswith(f".{name}")) for name in config.distill.students}
    row = {"device": str(device), "preset": args.preset, "teacher": args.teacher_arch, "batch": config.train.batch_size,
           "shared_step_s": shared_s, "teacher_s": shared.get("teacher", 0.0), "student_s": students,
           "separate_step_s": separate, "shared_over_separate": shared_s / sum(separate.values()), "sections_s": shared}
    print(f"{args.preset} on {device} (teacher {args.teacher_arch}, batch {row['batch']}): one shared step for "
          f"{len(students)} students {shared_s * 1000:.0f} ms (teacher {row['teacher_s'] * 1000:.0f} ms; "
          + ", ".join(f"{n} {t * 1000:.0f} ms" for n, t in students.items())
          + f") against {sum(separate.values()) * 1000:.0f} ms for {len(separate)} separate runs ("
          + ", ".join(f"{n} {t * 1000:.0f} ms" for n, t in separate.items())
          + f"): x{row['shared_over_separate']:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
