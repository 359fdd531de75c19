"""Curate plan stage: count the sources' items and cut them into partitions (the pipeline's
fan-out of ingest + validate; gramline.curate.partition).

    python -m gramline.stages.curate_plan --source URI [--source URI ...]
        [--preset tiny|large] [--config FILE] [--set key=value ...] [--executor-output FILE]

Prints the plan and returns it as the output parameter `partitions` (one JSON object per
partition, the items of `gramline.stages.curate_partition --partition`). A bad source or config
exits 2 naming it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from gramline.artifacts import write_executor_output
from gramline.config import load_stage_config
from gramline.curate.config import CurateConfig
from gramline.curate.pipeline import plan
from gramline.stages.common import run_stage, stage_parser

STAGE = "curate"  # its presets and config are the curate stage's


def main(argv: Sequence[str] | None = None) -> int:
    parser = stage_parser("curate_plan", "Cut the curation sources into partitions.")
    parser.add_argument("--source", action="append", required=True, metavar="URI",
                        help="as for gramline.stages.curate (repeatable)")
    args = parser.parse_args(argv)
    cfg = load_stage_config(CurateConfig, STAGE, args.preset, args.config, args.overrides)
    partitions = [p.to_json() for p in plan(args.source, cfg).partitions]
    print(json.dumps(partitions))
    write_executor_output(args.executor_output, {}, {"partitions": partitions})
    return 0


def main_cli(argv: Sequence[str] | None = None) -> None:
    run_stage(main, argv)


if __name__ == "__main__":
    main_cli(None)
