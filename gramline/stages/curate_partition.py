"""Curate partition stage: ingest + validate one partition of a curation plan into its output.

    python -m gramline.stages.curate_partition --source URI [--source URI ...] --partition JSON
        --out-part DIR [--preset tiny|large] [--config FILE] [--set key=value ...] [--executor-output FILE]

`--partition` is one item of gramline.stages.curate_plan's `partitions`. The output directory holds
the partition's ingest chunks and, written last, `manifest.json` (gramline.curate.workdir.PartDir);
with `partition.work_root` set, a partition already complete there is not ingested again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from gramline.config import load_stage_config
from gramline.curate.config import CurateConfig
from gramline.curate.partition import Partition
from gramline.curate.pipeline import run_partition
from gramline.errors import InputError
from gramline.stages.common import emit_executor_output, run_stage, stage_parser

STAGE = "curate"  # its presets and config are the curate stage's


def main(argv: Sequence[str] | None = None) -> int:
    parser = stage_parser("curate_partition", "Ingest and validate one partition of a curation plan.")
    parser.add_argument("--source", action="append", required=True, metavar="URI",
                        help="the sources the plan was made for (repeatable)")
    parser.add_argument("--partition", required=True, metavar="JSON", help="one partition of the plan")
    parser.add_argument("--out-part", type=Path, required=True, help="output directory of the partition")
    args = parser.parse_args(argv)
    try:
        value = json.loads(args.partition)
    except ValueError as err:
        raise InputError("--partition", f"is not valid JSON ({err})", "a partition object of the plan") from None
    partition = Partition.from_json(value, "--partition")
    cfg = load_stage_config(CurateConfig, STAGE, args.preset, args.config, args.overrides)
    manifest = run_partition(args.source, cfg, partition, args.out_part)
    keys = ("index", "start", "stop", "chunks", "plan_id", "skipped")
    emit_executor_output(args, {"part": (args.out_part, {k: manifest[k] for k in keys})})
    return 0


def main_cli(argv: Sequence[str] | None = None) -> None:
    run_stage(main, argv)


if __name__ == "__main__":
    main_cli(None)
