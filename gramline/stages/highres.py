"""highres: high-resolution adaptation with a fixed Gram teacher (reference §4 high-res list, §6.3).

    python -m gramline.stages.highres --model GRAM_DIR --dataset DIR --out-model DIR
        [--preset tiny] [--config FILE] [--set key=value ...] [--executor-output FILE] [--output-uri model=URI]

A new run initialised from the teacher in --model (normally the gram stage's output): the student
and its EMA teacher start as that teacher (backbone, mask token, DINO and iBOT heads), and the Gram
teacher is that teacher, frozen for the whole stage. Each step uses one (global, local, Gram)
resolution set of `phase.resolutions`, drawn with their weights from a generator seeded by the step
number, so all ranks use the same sizes; the Gram teacher sees `phase.gram_size_factor` (1.5) x the
global size. KoLeo searches neighbours in groups of `phase.koleo_group_size` samples across
adjacent ranks. Gram weight 1.5, DINO local weight 0.5, τ_t 0.07, momentum 0.999, LR a half-cosine
ramp from 0 then constant. Started again on the same --out-model it resumes from its last checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from gramline.artifacts import lineage_entry
from gramline.data.shards import open_dataset
from gramline.phase_presets import load_highres_config
from gramline.stages.common import run_stage, stage_parser
from gramline.train import distributed
from gramline.train.data import batch_source
from gramline.train.engine import Hooks, SSLTrainer
from gramline.train.phases import (
    load_gram_backbone,
    mixture_augments,
    mixture_choice,
    require_teacher_with_heads,
    resolution_counts,
    ssl_state_from_model,
)
from gramline.train.run import check_resume_compatible, train_and_export

StepHook = Callable[[SSLTrainer, int], None]


def main(argv: Sequence[str] | None = None, *, hooks: Sequence[StepHook] = ()) -> int:
    """`hooks` run after every step (tests use them to interrupt a run)."""
    parser = stage_parser("highres", "high-resolution adaptation with a fixed Gram teacher")
    parser.add_argument("--model", type=Path, required=True, help="Model artifact to adapt (the gram stage's)")
    parser.add_argument("--dataset", type=Path, required=True, help="Dataset artifact directory")
    parser.add_argument("--out-model", type=Path, required=True, help="output Model artifact directory")
    args = parser.parse_args(argv)

    manifest = require_teacher_with_heads(args.model, "--model")
    config = load_highres_config(args.preset, args.config, args.overrides, manifest.get("config") or {},
                                 flag=f"--model {args.model}")
    init_student = ssl_state_from_model(args.model, config, "--model")
    gram_teacher = load_gram_backbone(args.model, config, "--model")
    info = open_dataset(args.dataset)
    info.shard_counts("train")
    check_resume_compatible(args.out_model, config)

    env = distributed.setup()
    try:
        out_dir: Path = args.out_model
        out_dir.mkdir(parents=True, exist_ok=True)
        choice = mixture_choice(config)
        batches = batch_source(info, config, env, augments=mixture_augments(config), choose=choice)
        trainer = SSLTrainer(config, out_dir, batches, env, init_student=init_student, gram_teacher=gram_teacher,
                             hooks=Hooks(after_step=list(hooks)), stage="highres")
        del init_student
        trainer.log_keys += ["gram_weight"]
        if config.phase.koleo_group_size:
            trainer.extra_state["koleo_group_size"] = config.phase.koleo_group_size
        sets = [{"global_size": r.global_size, "local_size": r.local_size, "gram_size": config.gram_size_of(i),
                 "weight": r.weight} for i, r in enumerate(config.phase.resolutions)]
        record = {"resolutions": sets, "steps_per_set": resolution_counts(choice, range(config.train.steps)),
                  "koleo_group_size": config.phase.koleo_group_size, "gram_teacher": str(args.model)}
        inputs = [lineage_entry("model", args.model), lineage_entry("dataset", args.dataset)]
        train_and_export(args, trainer, out_dir, "highres", inputs, extra_manifest={"highres_phase": record})
    finally:
        distributed.teardown()
    return 0


def main_cli(argv: Sequence[str] | None = None) -> None:
    run_stage(main, argv)


if __name__ == "__main__":
    main_cli(None)
