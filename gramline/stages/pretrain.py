"""pretrain: DINOv3 SSL pretraining (DINO + iBOT + KoLeo) on a Dataset's train shards.

    python -m gramline.stages.pretrain --dataset DIR --out-model DIR [--preset tiny]
        [--config FILE] [--set key=value ...] [--executor-output FILE] [--output-uri model=URI]

Runs under `torchrun --nproc-per-node N` too (DDP; `train.distributed=fsdp` for FSDP2). Started
again on the same --out-model it resumes from the last complete checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from gramline.artifacts import lineage_entry
from gramline.config import load_ssl_config
from gramline.data.shards import open_dataset
from gramline.stages.common import run_stage, stage_parser
from gramline.train import distributed
from gramline.train.data import batch_source
from gramline.train.engine import SSLTrainer
from gramline.train.run import check_resume_compatible, train_and_export


def main(argv: Sequence[str] | None = None) -> int:
    parser = stage_parser("pretrain", "DINOv3 SSL pretraining")
    parser.add_argument("--dataset", type=Path, required=True, help="Dataset artifact directory")
    parser.add_argument("--out-model", type=Path, required=True, help="output Model artifact directory")
    args = parser.parse_args(argv)

    config = load_ssl_config(args.preset, args.config, args.overrides)
    info = open_dataset(args.dataset)
    info.shard_counts("train")
    check_resume_compatible(args.out_model, config)

    env = distributed.setup()
    try:
        out_dir: Path = args.out_model
        out_dir.mkdir(parents=True, exist_ok=True)
        trainer = SSLTrainer(config, out_dir, batch_source(info, config, env), env, stage="pretrain")
        train_and_export(args, trainer, out_dir, "pretrain", [lineage_entry("dataset", args.dataset)])
    finally:
        distributed.teardown()
    return 0


def main_cli(argv: Sequence[str] | None = None) -> None:
    run_stage(main, argv)


if __name__ == "__main__":
    main_cli(None)
