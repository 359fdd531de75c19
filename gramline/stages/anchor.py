"""anchor: pick the Gram teacher from a pretrain run's teacher checkpoints.

    python -m gramline.stages.anchor --model PRETRAIN_DIR [--dataset DIR] --out-model DIR
        [--preset tiny] [--config FILE] [--set anchor.step=N] [--set key=value ...]
        [--executor-output FILE] [--output-uri model=URI]

With `anchor.step=N` the teacher checkpoint of step N is taken; otherwise every candidate
checkpoint is scored on the dataset's eval split with the label-free dense diagnostics and the
best patch correspondence wins (gramline.eval.anchor explains the choice). The output is a frozen
Gram-teacher Model: the chosen backbone only, with a manifest naming the checkpoint and every
candidate's scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gramline.eval.anchor import AnchorRequest, load_anchor_config, run_anchor
from gramline.stages.common import emit_executor_output, run_stage, stage_parser

STAGE = "anchor"


def main(argv: Sequence[str] | None = None) -> int:
    parser = stage_parser(STAGE, "choose the Gram teacher (anchor) from a pretrain run's teacher checkpoints")
    parser.add_argument("--model", type=Path, required=True, help="pretrain Model artifact (with checkpoints/)")
    parser.add_argument("--dataset", type=Path, default=None, help="Dataset artifact whose eval split scores them")
    parser.add_argument("--out-model", type=Path, required=True, help="output Model artifact directory")
    args = parser.parse_args(argv)

    config = load_anchor_config(args.preset, args.config, args.overrides)
    anchor = run_anchor(AnchorRequest(args.model, args.dataset, args.out_model), config)
    manifest = anchor.manifest
    meta = {"timm_model": manifest["timm"]["name"], "arch": manifest.get("arch"), "step": anchor.step,
            "mode": anchor.mode, **manifest["metrics"]}
    emit_executor_output(args, {"model": (args.out_model, meta)})
    print(f"[{STAGE}] anchor = {anchor.checkpoint.name} (by {anchor.mode}) written to {args.out_model}", flush=True)
    return 0


def main_cli(argv: Sequence[str] | None = None) -> None:
    run_stage(main, argv)


if __name__ == "__main__":
    main_cli(None)
