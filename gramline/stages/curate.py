"""Curate stage: ingest, validate, deduplicate, cluster-balance and shard an image collection.

    python -m gramline.stages.curate --source URI [--source URI ...] --out-dataset DIR
        [--partition-outputs DIR ... | --executor-input JSON]
        [--preset tiny|large] [--config FILE] [--set key=value ...] [--executor-output FILE]

Alone it runs everything in this process: the plan, every partition, the reduce. With the outputs
of gramline.stages.curate_partition (`--partition-outputs`, or in the pipeline the KFP executor
input whose list input `parts` collects them) it runs the reduce only.

Sources: directories, .tar archives, .parquet/.csv manifests, s3://bucket/prefix, tar shards (a
directory or prefix of .tar files, or a brace pattern `.../train-{000000..000999}.tar`), and
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
from gramline.curate.pipeline import curate, reduce
from gramline.data.format import STATS
from gramline.errors import InputError
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


# where the KFP launcher mounts artifact stores in the task's container (kfp.dsl.types.artifact_types)
_MOUNTS = {"gs://": "/gcs/", "s3://": "/s3/", "minio://": "/minio/"}


def collected_paths(executor_input: str, name: str = "parts") -> list[Path]:
    """Local paths of the artifacts of the list input `name` in a KFP executor input (`{{$}}`)."""
    try:
        artifacts = json.loads(executor_input)["inputs"]["artifacts"][name]["artifacts"]
        uris = [str(a["uri"]) for a in artifacts]
    except (ValueError, KeyError, TypeError) as err:
        raise InputError("--executor-input", f"has no artifact list {name!r} ({err!r})",
                         "the KFP executor input of the curate reduce task") from None
    paths = []
    for uri in uris:
        for scheme, mount in _MOUNTS.items():
            if uri.startswith(scheme):
                uri = mount + uri[len(scheme):]
        paths.append(Path(uri))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = stage_parser(STAGE, "Ingest, validate, deduplicate, cluster-balance and shard an image collection.")
    parser.add_argument("--source", action="append", required=True, metavar="URI",
                        help="dir, .tar, .parquet/.csv manifest, s3://bucket/prefix, tar shards (a dir/prefix of "
                             ".tar files or dir/train-{000000..000999}.tar) or synthetic:n=N,size=S,seed=K (repeatable)")
    parser.add_argument("--out-dataset", type=Path, required=True, help="output Dataset artifact directory")
    parser.add_argument("--partition-outputs", type=Path, nargs="+", default=None, metavar="DIR",
                        help="reduce only: the output directories of every partition of the plan")
    parser.add_argument("--executor-input", default=None, metavar="JSON",
                        help="reduce only: the KFP executor input ({{$}}) whose list input `parts` holds them")
    args = parser.parse_args(argv)
    cfg = load_stage_config(CurateConfig, STAGE, args.preset, args.config, args.overrides)
    parts = args.partition_outputs or (collected_paths(args.executor_input) if args.executor_input else None)
    if parts is None:
        manifest = curate(args.source, cfg, args.out_dataset)
    else:
        manifest = reduce(args.source, cfg, parts, args.out_dataset)
    emit_executor_output(args, {"dataset": (args.out_dataset, dataset_metadata(args.out_dataset, manifest))})
    return 0


def main_cli(argv: Sequence[str] | None = None) -> None:
    run_stage(main, argv)


if __name__ == "__main__":
    main_cli(None)
