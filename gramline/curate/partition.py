"""The curation plan: the sources' items cut into partitions that are ingested independently.

The items of all sources, in source order and each source's own listing order, have one global
index `idx`. A plan counts every source's items (a tar, whose size is unknown, is read once to count
them) and cuts [0, total) into contiguous ranges of `partition.items` items, or into
`partition.count` equal ranges; partition i ingests the items [start, stop) with their global
`idx` (gramline.curate.ingest.ingest_partition), so that the reduce sees the same items in the
same order, with the same keys, as one pass over everything would, however it was cut.

The plan id is a digest of what a partition's output depends on: the sources, their counts, the
cuts and the ingest-side config (`ingest`, `images`, the dedup descriptor's views). It names the
partition outputs under `partition.work_root`, so a re-run of the same plan skips the complete
ones, while a change of dedup thresholds, clustering or output settings keeps them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gramline.curate.config import CurateConfig
from gramline.curate.log import log
from gramline.curate.sources import Source
from gramline.errors import InputError

PLAN_VERSION = 1  # bump when a partition's output format changes


@dataclass(frozen=True)
class Partition:
    index: int
    start: int        # first global idx
    stop: int         # one past the last
    plan_id: str
    counts: tuple[int, ...]  # items per source, as planned (every partition re-opens the sources)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "counts": list(self.counts)}

    @classmethod
    def from_json(cls, value: Any, what: str) -> Partition:
        """A partition from its JSON (ints may arrive as floats through KFP's parameter structs)."""
        try:
            part = cls(int(value["index"]), int(value["start"]), int(value["stop"]), str(value["plan_id"]),
                       tuple(int(c) for c in value["counts"]))
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(what, f"is not a partition of a curation plan ({err!r})",
                             '{"index", "start", "stop", "plan_id", "counts"} as the plan wrote it') from None
        if not 0 <= part.start < part.stop <= sum(part.counts):
            raise InputError(what, f"has the item range [{part.start}, {part.stop}) outside the plan's "
                                   f"{sum(part.counts)} items", "a partition of the plan")
        return part


@dataclass(frozen=True)
class Plan:
    plan_id: str
    counts: tuple[int, ...]
    partitions: tuple[Partition, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)


def source_counts(sources: Sequence[Source]) -> list[int]:
    """Items per source: the listing's size, or for a tar one streaming pass that counts them."""
    counts = []
    for source in sources:
        hint = source.size_hint()
        if hint is None:
            log(f"plan: counting the items of {source.uri} (one pass over the stream)")
            hint = sum(1 for _ in source.items())
        counts.append(hint)
    return counts


def ingest_config(cfg: CurateConfig) -> dict[str, Any]:
    """The config a partition's output depends on (not the thread count)."""
    return {"ingest": cfg.ingest.model_dump(mode="json", exclude={"workers"}),
            "images": cfg.images.model_dump(mode="json"),
            "view_grid": cfg.dedup.view_grid, "view_scale": cfg.dedup.view_scale}


def cut(total: int, items: int, count: int, max_count: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering [0, total): `items` each, or `count` equal ones (items == 0);
    never more than `max_count` (larger ranges instead)."""
    size = max(items or math.ceil(total / count), math.ceil(total / max_count))
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def make_plan(source_uris: Sequence[str], sources: Sequence[Source], cfg: CurateConfig) -> Plan:
    counts = tuple(source_counts(sources))
    total = sum(counts)
    if total == 0:
        raise InputError("--source " + " ".join(source_uris), "yielded no items", "at least one image")
    part = cfg.partition
    ranges = cut(total, part.items, part.count, part.max_count)
    if part.items and len(ranges) * part.items < total:
        log(f"plan: {total} items in partitions of {part.items} would make more than partition.max_count="
            f"{part.max_count}; cut into {len(ranges)} of {ranges[0][1]} items instead")
    digest = hashlib.sha256(json.dumps({"version": PLAN_VERSION, "sources": list(source_uris), "counts": counts,
                                        "ranges": ranges, "config": ingest_config(cfg)},
                                       sort_keys=True).encode()).hexdigest()
    plan_id = digest[:16]
    parts = tuple(Partition(i, start, stop, plan_id, counts) for i, (start, stop) in enumerate(ranges))
    log(f"plan {plan_id}: {total} items in {len(parts)} partition(s)")
    return Plan(plan_id, counts, parts)


def check_counts(sources: Sequence[Source], partition: Partition) -> None:
    """A source whose listing size changed since planning would shift every later idx."""
    if len(sources) != len(partition.counts):
        raise InputError("--source", f"names {len(sources)} source(s), the plan {len(partition.counts)}",
                         "the sources the plan was made for")
    for source, count in zip(sources, partition.counts):
        hint = source.size_hint()
        if hint is not None and hint != count:
            raise InputError(f"--source {source.uri}", f"lists {hint} items, the plan counted {count}",
                             "sources that do not change while they are curated")


def stored_partition(work_root: str, partition: Partition) -> Path:
    """Where `partition` is kept under `partition.work_root` (keyed by plan id)."""
    return Path(work_root) / f"plan-{partition.plan_id}" / f"part-{partition.index:05d}"


def check_complete(manifests: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The partition manifests in order, checked to be one plan's partitions, all of them."""
    ordered = sorted(manifests, key=lambda m: int(m["start"]))
    if not ordered:
        raise InputError("--partition", "no partition outputs were given", "the outputs of every partition")
    ids = {m["plan_id"] for m in ordered}
    if len(ids) != 1:
        raise InputError("--partition", f"outputs come from several plans ({', '.join(sorted(ids))})",
                         "the partitions of one plan")
    expected = 0
    for m in ordered:
        if int(m["start"]) != expected:
            raise InputError("--partition", f"outputs leave items [{expected}, {m['start']}) of plan "
                                            f"{m['plan_id']} uncovered", "every partition of the plan")
        expected = int(m["stop"])
    if expected != sum(ordered[0]["counts"]):
        raise InputError("--partition", f"outputs end at item {expected} of {sum(ordered[0]['counts'])}",
                         "every partition of the plan")
    return ordered
