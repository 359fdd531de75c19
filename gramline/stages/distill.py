"""distill: several students from one frozen teacher, sharing every teacher forward (DINOv3 paper §5).

    python -m gramline.stages.distill --teacher DIR --dataset DIR --out-model DIR [--student NAME=ARCH ...]
        [--preset tiny] [--config FILE] [--set key=value ...] [--executor-output FILE] [--output-uri model=URI]

The teacher is a Model with its DINO and iBOT heads (the highres, gram or pretrain stage's output).
Each student (`--student NAME=ARCH`, or the preset's `distill.students`) has its own heads with the
teacher's prototype counts, optimizer, schedules and EMA copy; every step the teacher runs once and
every student learns its targets on the same crops. Under `torchrun` the processes split into one
group per student (`distill.ranks`, default by student size), each student seeing the whole global
batch. Output: `students/<name>/`, one Model artifact per student (its EMA copy, loadable by plain
timm, naming the teacher in its lineage), and a summary manifest with each student's agreement with
the teacher on the eval split against a random-init student. Started again on the same --out-model
it resumes from the last complete checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from gramline.artifacts import lineage_entry, read_manifest, write_manifest
from gramline.errors import InputError
from gramline.eval.agreement import distillation_agreement
from gramline.stages.common import (
    add_state_option,
    add_ui_metadata_option,
    emit_training_output,
    run_stage,
    stage_parser,
)
from gramline.train.data import batch_source
from gramline.train.recipes.dino.model import DinoModel
from gramline.train.recipes.distill.config import check_heads, load_distill_config
from gramline.train.recipes.distill.inputs import load_dino_model
from gramline.train.recipes.distill.recipe import STUDENTS_DIR, DistillRecipe
from gramline.train.run import StepHook, TrainingRun, run_training


def main(argv: Sequence[str] | None = None, *, hooks: Sequence[StepHook] = ()) -> int:
    """`hooks(recipe, step)` run after every step (tests use them to interrupt a run)."""
    parser = stage_parser("distill", "distil several students from one frozen teacher")
    parser.add_argument("--teacher", type=Path, required=True, help="teacher Model artifact (with heads)")
    parser.add_argument("--dataset", type=Path, required=True, help="Dataset artifact directory")
    parser.add_argument("--out-model", type=Path, required=True, help="output directory: students/<name>/ + manifest")
    parser.add_argument("--student", action="append", default=[], metavar="NAME=ARCH",
                        help="a student (repeatable); replaces the preset's students")
    add_state_option(parser)
    add_ui_metadata_option(parser)
    args = parser.parse_args(argv)

    config = load_distill_config(args.preset, args.config, args.overrides, args.student)
    teacher, teacher_config = load_dino_model(args.teacher, "--teacher")
    if teacher_config.patch_size != config.patch_size:
        raise InputError(f"--teacher {args.teacher}", f"has patch size {teacher_config.patch_size}, the students "
                         f"{config.patch_size}", "students with the teacher's patch size (the iBOT targets are per patch)")
    heads = check_heads(config, teacher_config.heads, "--teacher")
    recipe = DistillRecipe(config, teacher, heads)
    recipe.plan_groups(int(os.environ.get("WORLD_SIZE", "1")))  # bad groups fail before anything is written
    result = run_training(TrainingRun(
        stage="distill", config=config, dataset=args.dataset, out_dir=args.out_model, recipe=recipe,
        batches=lambda info, env: batch_source(info, config, env, global_batches=True),
        inputs=[lineage_entry("teacher", args.teacher), lineage_entry("dataset", args.dataset)],
        record=lambda: {"teacher": str(args.teacher)}, periodic_exports=False, frozen_sections=("distill",),
        hooks=hooks, state_uri=args.state_uri,
        artifact=args.executor_output is not None))
    if result is None:
        return 0
    students = {name: load_dino_model(args.out_model / STUDENTS_DIR / name, f"student {name}")[0]
                for name in config.distill.students}
    with torch.random.fork_rng():
        torch.manual_seed(config.train.seed)
        baselines = {s.name: DinoModel(s.backbone, s.heads) for s in recipe.students}
    scores = distillation_agreement(teacher, students, baselines, args.dataset, config.crops.global_size)
    manifest = read_manifest(args.out_model)
    write_manifest(args.out_model, {**manifest, "metrics": {**manifest["metrics"], **scores}})
    for line in (f"[distill] {name}: CKA {scores[f'{name}/cka_cls']:.3f} (random {scores[f'random_{name}/cka_cls']:.3f}), "
                 f"prototype agreement {scores[f'{name}/prototype_agreement']:.3f} (random "
                 f"{scores[f'random_{name}/prototype_agreement']:.3f})" for name in students):
        print(line, flush=True)
    emit_training_output(args, {**result.metadata, **scores}, result.tensorboard_dir)
    return 0


def main_cli(argv: Sequence[str] | None = None) -> None:
    run_stage(main, argv)


if __name__ == "__main__":
    main_cli(None)
