"""highres: high-resolution adaptation with a fixed Gram teacher (DINOv3 paper §4.3).

    python -m gramline.stages.highres --model GRAM_DIR --dataset DIR --out-model DIR
        [--preset tiny] [--config FILE] [--set key=value ...] [--executor-output FILE] [--output-uri model=URI]

A new run initialised from the teacher in --model (normally the gram stage's output): the student
and its EMA teacher start as that teacher (backbone, mask token, DINO and iBOT heads), and the Gram
teacher is that teacher's backbone, frozen for the whole stage. Each step uses one (global, local,
Gram) resolution set of `phase.resolutions`, drawn with their weights by a generator seeded by the
step number, so all ranks use the same sizes; the Gram teacher sees `phase.gram_size_factor` (1.5)
x the global size. KoLeo searches neighbours in groups of `loss.koleo_group_size` samples across
adjacent ranks. Started again on the same --out-model it resumes from its last checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gramline.artifacts import lineage_entry
from gramline.stages.common import (
    add_state_option,
    add_ui_metadata_option,
    emit_training_output,
    run_stage,
    stage_parser,
)
from gramline.train.data import batch_source
from gramline.train.recipes.dino.config import load_highres_config
from gramline.train.recipes.dino.inputs import (
    dino_state_from_model,
    load_gram_backbone,
    require_teacher_with_heads,
)
from gramline.train.recipes.dino.mixture import mixture_augments, mixture_choice, resolution_counts
from gramline.train.recipes.dino.recipe import DinoRecipe
from gramline.train.run import StepHook, TrainingRun, run_training


def main(argv: Sequence[str] | None = None, *, hooks: Sequence[StepHook] = ()) -> int:
    """`hooks(recipe, step)` run after every step (tests use them to interrupt a run)."""
    parser = stage_parser("highres", "high-resolution adaptation with a fixed Gram teacher")
    parser.add_argument("--model", type=Path, required=True, help="Model artifact to adapt (the gram stage's)")
    parser.add_argument("--dataset", type=Path, required=True, help="Dataset artifact directory")
    parser.add_argument("--out-model", type=Path, required=True, help="output Model artifact directory")
    add_state_option(parser)
    add_ui_metadata_option(parser)
    args = parser.parse_args(argv)

    manifest = require_teacher_with_heads(args.model, "--model")
    config = load_highres_config(args.preset, args.config, args.overrides, manifest.get("config") or {},
                                 flag=f"--model {args.model}")
    recipe = DinoRecipe(config, "highres", gram_anchor=load_gram_backbone(args.model, config, "--model"),
                        init_student=dino_state_from_model(args.model, config, "--model"))
    choice = mixture_choice(config)
    sets = [{"global_size": r.global_size, "local_size": r.local_size, "gram_size": config.gram_size_of(i),
             "weight": r.weight} for i, r in enumerate(config.phase.resolutions)]
    record = {"highres_phase": {"resolutions": sets, "steps_per_set": resolution_counts(choice, range(config.train.steps)),
                                "koleo_group_size": config.loss.koleo_group_size, "gram_teacher": str(args.model)}}
    result = run_training(TrainingRun(
        stage="highres", config=config, dataset=args.dataset, out_dir=args.out_model, recipe=recipe,
        batches=lambda info, env: batch_source(info, config, env, augments=mixture_augments(config), choose=choice),
        inputs=[lineage_entry("model", args.model), lineage_entry("dataset", args.dataset)],
        record=lambda: record, hooks=hooks, state_uri=args.state_uri,
        artifact=args.executor_output is not None))
    if result is not None:
        emit_training_output(args, result.metadata, result.tensorboard_dir)
    return 0


def main_cli(argv: Sequence[str] | None = None) -> None:
    run_stage(main, argv)


if __name__ == "__main__":
    main_cli(None)
