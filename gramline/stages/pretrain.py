"""pretrain: DINOv3 self-supervised pretraining (DINO + iBOT + KoLeo) on a Dataset's train shards,
from scratch or from existing weights (`--init-from`: domain adaptation).

    python -m gramline.stages.pretrain --dataset DIR --out-model DIR [--preset tiny]
        [--init-from timm:<name>[@<file>] | MODEL_DIR | CHECKPOINT.pth]
        [--config FILE] [--set key=value ...] [--executor-output FILE] [--output-uri model=URI]

With --init-from the preset comes from the `adapt` table (gramline/presets.py): the student and its
EMA teacher start as the given backbone (and its mask token and heads when it has them); new heads
first train alone on the frozen backbone (`init.head_warmup_steps`); the starting backbone is the
fixed Gram teacher from step 0 (`gram.enabled`). Runs under `torchrun --nproc-per-node N` too (DDP;
`train.distributed=fsdp` for FSDP2). Started again on the same --out-model it resumes from the last
complete checkpoint.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from gramline.artifacts import lineage_entry
from gramline.models.init_from import load_starting_weights
from gramline.stages.common import (
    add_state_option,
    add_ui_metadata_option,
    emit_training_output,
    run_stage,
    stage_parser,
)
from gramline.train.data import batch_source
from gramline.train.recipes.dino.config import DinoConfig, load_adapt_config, load_pretrain_config
from gramline.train.recipes.dino.inputs import starting_backbone, starting_state
from gramline.train.recipes.dino.recipe import DinoRecipe
from gramline.train.run import StepHook, TrainingRun, run_training


def main(argv: Sequence[str] | None = None, *, hooks: Sequence[StepHook] = ()) -> int:
    """`hooks(recipe, step)` run after every step (tests use them to interrupt a run)."""
    parser = stage_parser("pretrain", "DINOv3 SSL pretraining")
    parser.add_argument("--dataset", type=Path, required=True, help="Dataset artifact directory")
    parser.add_argument("--out-model", type=Path, required=True, help="output Model artifact directory")
    parser.add_argument("--init-from", default=None, metavar="SPEC",
                        help="start from existing weights: timm:<name>[@<file>], a Model directory or an official "
                             "DINOv3 checkpoint (.pth); empty: from scratch")
    add_state_option(parser)
    add_ui_metadata_option(parser)
    args = parser.parse_args(argv)

    inputs = [lineage_entry("dataset", args.dataset)]
    record: dict = {}
    if args.init_from:
        config, recipe, record = _adaptation(args, inputs)
    else:
        config = load_pretrain_config(args.preset, args.config, args.overrides)
        recipe = DinoRecipe(config, "pretrain")
    result = run_training(TrainingRun(
        stage="pretrain", config=config, dataset=args.dataset, out_dir=args.out_model,
        recipe=recipe, batches=lambda info, env: batch_source(info, config, env),
        inputs=inputs, record=lambda: record, hooks=hooks, state_uri=args.state_uri,
        artifact=args.executor_output is not None))
    if result is not None:
        emit_training_output(args, result.metadata, result.tensorboard_dir)
    return 0


def _adaptation(args: argparse.Namespace, inputs: list[dict]) -> tuple[DinoConfig, DinoRecipe, dict]:
    """Config, recipe and manifest record of a run that starts from `--init-from`."""
    # the architecture asked for (the warm-up is checked once the weights say whether heads come along)
    preferred = load_adapt_config(args.preset, args.config, args.overrides, heads_loaded=True).backbone.arch
    start = load_starting_weights(args.init_from, prefer=preferred)
    config = load_adapt_config(args.preset, args.config, args.overrides, start.arch, start.has_heads)
    if start.arch != preferred:
        print(f"[pretrain] backbone.arch is {start.arch}, the architecture of --init-from {args.init_from} "
              f"(the preset's is {preferred})", flush=True)
    warmup = config.init.head_warmup_steps
    print(f"[pretrain] starting from {start.describe()}; "
          + (f"new heads train alone for {warmup} steps; " if warmup else "")
          + ("Gram-anchored to the starting backbone" if config.gram.enabled else "no Gram anchor"), flush=True)
    anchor = starting_backbone(start, config) if config.gram.enabled else None
    recipe = DinoRecipe(config, "pretrain", gram_anchor=anchor, init_student=starting_state(start, config))
    if start.kind == "model":
        inputs.append(lineage_entry("init_from", Path(args.init_from)))
    record = {"init_from": {"spec": args.init_from, **start.record, "arch": start.arch, "heads_loaded": start.has_heads,
                            "head_warmup_steps": warmup, "gram_anchored": config.gram.enabled}}
    return config, recipe, record


def main_cli(argv: Sequence[str] | None = None) -> None:
    run_stage(main, argv)


if __name__ == "__main__":
    main_cli(None)
