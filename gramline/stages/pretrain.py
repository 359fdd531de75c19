"""pretrain: DINOv3 self-supervised pretraining (DINO + iBOT + KoLeo) on a Dataset's train shards.

    python -m gramline.stages.pretrain --dataset DIR --out-model DIR [--preset tiny]
        [--config FILE] [--set key=value ...] [--executor-output FILE] [--output-uri model=URI]

Runs under `torchrun --nproc-per-node N` too (DDP; `train.distributed=fsdp` for FSDP2). Started
again on the same --out-model it resumes from the last complete checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gramline.artifacts import lineage_entry
from gramline.stages.common import emit_executor_output, run_stage, stage_parser
from gramline.train.data import batch_source
from gramline.train.recipes.dino.config import load_pretrain_config
from gramline.train.recipes.dino.recipe import DinoRecipe
from gramline.train.run import StepHook, TrainingRun, run_training


def main(argv: Sequence[str] | None = None, *, hooks: Sequence[StepHook] = ()) -> int:
    """`hooks(recipe, step)` run after every step (tests use them to interrupt a run)."""
    parser = stage_parser("pretrain", "DINOv3 SSL pretraining")
    parser.add_argument("--dataset", type=Path, required=True, help="Dataset artifact directory")
    parser.add_argument("--out-model", type=Path, required=True, help="output Model artifact directory")
    args = parser.parse_args(argv)

    config = load_pretrain_config(args.preset, args.config, args.overrides)
    result = run_training(TrainingRun(
        stage="pretrain", config=config, dataset=args.dataset, out_dir=args.out_model,
        recipe=DinoRecipe(config, "pretrain"), batches=lambda info, env: batch_source(info, config, env),
        inputs=[lineage_entry("dataset", args.dataset)], hooks=hooks))
    if result is not None:
        emit_executor_output(args, {"model": (args.out_model, result.metadata)})
    return 0


def main_cli(argv: Sequence[str] | None = None) -> None:
    run_stage(main, argv)


if __name__ == "__main__":
    main_cli(None)
