"""gram: Gram anchoring — continue a pretrain run with the Gram loss against an anchor (DINOv3 paper §4).

    python -m gramline.stages.gram --model PRETRAIN_DIR --anchor ANCHOR_DIR --dataset DIR --out-model DIR
        [--preset tiny] [--config FILE] [--set key=value ...] [--executor-output FILE] [--output-uri model=URI]

The run in --model carries on: student, teacher, optimizer, step counter, RNG and data position come
from its latest state/ checkpoint at step S, and the stage runs `phase.steps` more steps. The Gram
teacher (the anchor's backbone, frozen) sees the student's global crops at `phase.gram_size_factor`
x their size without photometric distortion; its patch map is resized bicubically to the student's
grid and the loss is the MSE of per-image Gram matrices of L2-normalised patches. The Gram weight
ramps 0 → `phase.weight` and the DINO local weight → `phase.local_weight` over `phase.ramp_steps`.
After each phase step in `phase.refresh_at` the Gram teacher becomes a copy of the EMA teacher;
`phase.ema_teacher=true` anchors to the live EMA teacher instead (then --anchor is not needed).
Schedules: gramline/train/recipes/dino/schedules.py. Started again on the same --out-model it
resumes from its own last checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gramline.artifacts import lineage_entry
from gramline.errors import InputError
from gramline.stages.common import (
    add_state_option,
    add_ui_metadata_option,
    emit_training_output,
    run_stage,
    stage_parser,
)
from gramline.train.checkpoint import latest_checkpoint
from gramline.train.data import batch_source
from gramline.train.recipes.dino.config import load_gram_config
from gramline.train.recipes.dino.inputs import (
    check_run_state,
    latest_run_state,
    load_gram_backbone,
    model_manifest,
)
from gramline.train.recipes.dino.recipe import DinoRecipe
from gramline.train.run import StepHook, TakeOver, TrainingRun, run_training


def main(argv: Sequence[str] | None = None, *, hooks: Sequence[StepHook] = ()) -> int:
    """`hooks(recipe, step)` run after every step (tests use them to interrupt a run)."""
    parser = stage_parser("gram", "Gram anchoring: continue a pretrain run with the Gram loss")
    parser.add_argument("--model", type=Path, required=True, help="pretrain Model artifact (the run to continue)")
    parser.add_argument("--anchor", type=Path, default=None, help="anchor Model artifact (the frozen Gram teacher)")
    parser.add_argument("--dataset", type=Path, required=True, help="Dataset artifact directory")
    parser.add_argument("--out-model", type=Path, required=True, help="output Model artifact directory")
    add_state_option(parser)
    add_ui_metadata_option(parser)
    args = parser.parse_args(argv)

    manifest = model_manifest(args.model, "--model")
    fresh = latest_checkpoint(args.out_model / "state") is None  # else this stage resumes its own run
    if fresh:
        latest_run_state(args.model, "--model")  # --model must be a run with training state
    config = load_gram_config(args.preset, args.config, args.overrides, manifest.get("config") or {},
                              flag=f"--model {args.model}")
    phase = config.phase
    needs_anchor = config.gram.enabled and not phase.ema_teacher
    if needs_anchor and args.anchor is None:
        raise InputError("--anchor", "is missing", "an anchor Model artifact (the anchor stage's output), or "
                         "--set phase.ema_teacher=true to anchor to the EMA teacher")
    anchor = load_gram_backbone(args.anchor, config, "--anchor") if needs_anchor else None
    if fresh:
        check_run_state(args.model, config, "--model")
    recipe = DinoRecipe(config, "gram", gram_anchor=anchor)

    def record() -> dict[str, Any]:
        start = recipe.phase.start_step
        return {"gram_phase": {
            "start_step": start, "steps": phase.steps, "refresh_at": [start + s for s in phase.refresh_at],
            "gram_teacher": "ema_teacher" if phase.ema_teacher else str(args.anchor),
            "refreshes": list(recipe.gram_teacher.refreshes) if recipe.gram_teacher is not None else []}}

    inputs = [lineage_entry("model", args.model), lineage_entry("dataset", args.dataset)]
    if anchor is not None:
        inputs.insert(1, lineage_entry("anchor", args.anchor))
    result = run_training(TrainingRun(
        stage="gram", config=config, dataset=args.dataset, out_dir=args.out_model, recipe=recipe,
        batches=lambda info, env: batch_source(info, config, env), inputs=inputs, record=record,
        take_over=TakeOver(args.model, ("student", "teacher", "optimizer"), "--model", recipe.begin_phase), hooks=hooks,
        state_uri=args.state_uri,
        artifact=args.executor_output is not None))
    if result is not None:
        emit_training_output(args, result.metadata, result.tensorboard_dir)
    return 0


def main_cli(argv: Sequence[str] | None = None) -> None:
    run_stage(main, argv)


if __name__ == "__main__":
    main_cli(None)
