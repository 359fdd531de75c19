"""Curate stage: ingest, validate, deduplicate, cluster-balance and shard an image collection.

    python -m gramline.stages.curate --source URI [--source URI ...] --out-dataset DIR
        [--preset tiny|large] [--config FILE] [--set key=value ...] [--executor-output FILE]

Sources: directories, .tar archives, .parquet/.csv manifests, s3://bucket/prefix, and
`synthetic:n=N,size=S,seed=K` (gramline.curate.sources). The steps and the resumable work
directory next to the output: gramline.curate.pipeline; the output layout: gramline.curate.write.
A bad source, config or embedder exits 2 naming it, before any work. S3 still failing after its
retries exits 75 naming the operation and object; running again continues where it stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gramline.config import load_stage_config
from gramline.curate.config import CurateConfig
from gramline.curate.pipeline import curate
from gramline.data.format import STATS
from gramline.stages.common import emit_executor_output, run_stage, stage_parser

STAGE = "curate"


def dataset_metadata(out_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The output artifact's metadata for KFP: split sizes, the funnel, cluster-size histograms and
    shard sizes."""
    shard_bytes = manifest.get("shard_bytes") or {  # S3 publishes record them
        split: [os.path.getsize(out_dir / u) for u in urls] for split, urls in manifest["shards"].items()}
    stats = json.loads((out_dir / STATS).read_text())
    clusters = stats.get("clusters", {})
    return {
        "splits": manifest["splits"],
        "counts": stats["funnel"],
        "quarantine": stats["quarantine"],
        # top-level cluster sizes, largest first (at most 200): the histograms before/after balancing
        "cluster_sizes_before": sorted(clusters.get("top_level_sizes_before", []), reverse=True)[:200],
        "cluster_sizes_after": sorted(clusters.get("top_level_sizes_after", []), reverse=True)[:200],
        "cluster_summary_before": clusters.get("summary_before", {}),
        "cluster_summary_after": clusters.get("summary_after", {}),
        "shard_counts": manifest.get("shard_counts", {}),
        "shard_bytes": shard_bytes,
        "shards_uri": manifest.get("shards_uri", ""),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = stage_parser(STAGE, "Ingest, validate, deduplicate, cluster-balance and shard an image collection.")
    parser.add_argument("--source", action="append", required=True, metavar="URI",
                        help="dir, .tar, .parquet/.csv manifest, s3://bucket/prefix or synthetic:n=N,size=S,seed=K"
                             " (repeatable)")
    parser.add_argument("--out-dataset", type=Path, required=True, help="output Dataset artifact directory")
    args = parser.parse_args(argv)
    cfg = load_stage_config(CurateConfig, STAGE, args.preset, args.config, args.overrides)
    manifest = curate(args.source, cfg, args.out_dataset)
    emit_executor_output(args, {"dataset": (args.out_dataset, dataset_metadata(args.out_dataset, manifest))})
    return 0


def main_cli(argv: Sequence[str] | None = None) -> None:
    run_stage(main, argv)


if __name__ == "__main__":
    main_cli(None)
