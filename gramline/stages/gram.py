"""gram: Gram anchoring — continue a pretrain run with the Gram loss against an anchor (reference §1.5, §6.2).

    python -m gramline.stages.gram --model PRETRAIN_DIR --anchor ANCHOR_DIR --dataset DIR --out-model DIR
        [--preset tiny] [--config FILE] [--set key=value ...] [--executor-output FILE] [--output-uri model=URI]

The run in --model carries on: student, teacher, heads, optimizer, step counter, RNG and data
position are loaded from its latest state/ checkpoint at step S, and the stage runs `phase.steps`
more steps (train.steps = S + phase.steps). The Gram teacher (the anchor's backbone, frozen) sees
the same crops as the student's global crops at `phase.gram_size_factor` x their size (2x) without
photometric distortion; its patch map is downsampled bicubically to the student's grid and the loss
is the MSE of per-image Gram matrices of L2-normalised patches. The Gram weight ramps 0 →
`phase.weight` and the DINO local weight 1 → `phase.local_weight`; EMA momentum 0.999. After each
phase step in `phase.refresh_at` the Gram teacher becomes a copy of the EMA teacher;
`phase.ema_teacher=true` anchors to the live EMA teacher instead (then --anchor is not needed).
Schedules are explained in gramline/phase_presets.py. Started again on the same --out-model it
resumes from its own last checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from gramline.artifacts import lineage_entry
from gramline.data.shards import open_dataset
from gramline.errors import InputError
from gramline.phase_presets import load_gram_config
from gramline.stages.common import run_stage, stage_parser
from gramline.train import distributed
from gramline.train.checkpoint import latest_checkpoint
from gramline.train.data import batch_source
from gramline.train.engine import Hooks, SSLTrainer
from gramline.train.phases import (
    GramRefresh,
    continue_run,
    latest_run_state,
    load_gram_backbone,
    model_manifest,
    use_ema_teacher,
)
from gramline.train.run import check_resume_compatible, train_and_export

StepHook = Callable[[SSLTrainer, int], None]


def phase_start(run_dir: Path, out_dir: Path) -> int:
    """S: where this stage took the run over (its own checkpoints record it; else the run's latest step)."""
    own = latest_checkpoint(out_dir / "state")
    if own is not None:
        extra = torch.load(own / "model.pt", map_location="cpu", weights_only=True, mmap=True).get("extra") or {}
        if "continued_from" in extra:
            return int(extra["continued_from"]["step"])
    return latest_run_state(run_dir)[0]


def main(argv: Sequence[str] | None = None, *, hooks: Sequence[StepHook] = ()) -> int:
    """`hooks` run after every step, after the stage's own (tests use them to interrupt a run)."""
    parser = stage_parser("gram", "Gram anchoring: continue a pretrain run with the Gram loss")
    parser.add_argument("--model", type=Path, required=True, help="pretrain Model artifact (the run to continue)")
    parser.add_argument("--anchor", type=Path, default=None, help="anchor Model artifact (the frozen Gram teacher)")
    parser.add_argument("--dataset", type=Path, required=True, help="Dataset artifact directory")
    parser.add_argument("--out-model", type=Path, required=True, help="output Model artifact directory")
    args = parser.parse_args(argv)

    manifest = model_manifest(args.model, "--model")
    start = phase_start(args.model, args.out_model)
    config = load_gram_config(args.preset, args.config, args.overrides, manifest.get("config") or {}, start,
                              flag=f"--model {args.model}")
    phase = config.phase
    if phase.ema_teacher:
        anchor = None
    elif args.anchor is None:
        raise InputError("--anchor", "is missing", "an anchor Model artifact (the anchor stage's output), or "
                         "--set phase.ema_teacher=true to anchor to the EMA teacher")
    else:
        anchor = load_gram_backbone(args.anchor, config, "--anchor")
    info = open_dataset(args.dataset)
    info.shard_counts("train")
    check_resume_compatible(args.out_model, config)

    env = distributed.setup()
    try:
        out_dir: Path = args.out_model
        out_dir.mkdir(parents=True, exist_ok=True)
        refresh = GramRefresh(frozenset(start + s for s in phase.refresh_at))
        trainer = SSLTrainer(config, out_dir, batch_source(info, config, env), env, gram_teacher=anchor,
                             hooks=Hooks(after_step=[refresh, *hooks]), stage="gram")
        if phase.ema_teacher:
            use_ema_teacher(trainer)
        trainer.log_keys += ["gram_weight", "local_weight"]
        record: dict[str, Any] = {"start_step": start, "steps": phase.steps,
                                  "gram_teacher": "ema_teacher" if phase.ema_teacher else str(args.anchor),
                                  "refresh_at": [start + s for s in phase.refresh_at]}

        def before_fit(t: SSLTrainer) -> None:
            if latest_checkpoint(t.state_dir) is None:  # a fresh stage: take the run over
                continue_run(t, args.model, "--model")
            # the refresh hook appends to this list; the manifest shows the refreshes that happened
            record["refreshes"] = t.extra_state.setdefault("gram_refreshes", [])

        inputs = [lineage_entry("model", args.model), lineage_entry("dataset", args.dataset)]
        if args.anchor is not None and anchor is not None:
            inputs.insert(1, lineage_entry("anchor", args.anchor))
        train_and_export(args, trainer, out_dir, "gram", inputs, extra_manifest={"gram_phase": record},
                         before_fit=before_fit)
    finally:
        distributed.teardown()
    return 0


def main_cli(argv: Sequence[str] | None = None) -> None:
    run_stage(main, argv)


if __name__ == "__main__":
    main_cli(None)
