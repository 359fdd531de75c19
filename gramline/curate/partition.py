"""The curation plan: the sources' items cut into partitions that are ingested independently.

The sources' items, in source order and each source's own listing order, are one global order,
which the partitions cut into contiguous pieces: partition i comes before partition i+1, and the
reduce reads them in that order, so the kept set, duplicates and eval split do not depend on the
cut. Two kinds of source are cut differently:
- counted sources (folders, manifests, S3 prefixes of images, a single tar, synthetic): the plan
  knows or counts their items (a tar is read once to count them); a run of such sources gets one
  item index `idx` and is cut into ranges [start, stop) of `partition.items` items, or into
  `partition.count` equal ranges;
- a set of tar shards (gramline.curate.sources.ShardSetSource) is cut into partitions of
  `partition.shards` whole shards, [start, stop) counting shards, without reading them: the plan
  of a 100M-image collection lists its shards, no more. The items of such a partition have `idx`
  from 0 within it, since the items before it are only counted by the partitions that read them.
No plan has more than `partition.max_count` partitions: larger ones are cut instead.

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
from gramline.curate.sources import ShardSetSource, Source
from gramline.errors import InputError

PLAN_VERSION = 2  # bump when a partition's output format changes


@dataclass(frozen=True)
class Partition:
    index: int
    start: int        # first idx of its counted sources' items, or its first shard
    stop: int         # one past the last
    plan_id: str
    counts: tuple[int, ...]  # items per source, shards for a shard set, as planned (every partition re-opens them)
    shard_set: int = -1  # the source index of the shard set it cuts; -1: a range of counted items
    of: int = 1       # the plan's number of partitions

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "counts": list(self.counts)}

    @classmethod
    def from_json(cls, value: Any, what: str) -> Partition:
        """A partition from its JSON (ints may arrive as floats through KFP's parameter structs)."""
        try:
            part = cls(int(value["index"]), int(value["start"]), int(value["stop"]), str(value["plan_id"]),
                       tuple(int(c) for c in value["counts"]), int(value["shard_set"]), int(value["of"]))
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(what, f"is not a partition of a curation plan ({err!r})",
                             '{"index", "start", "stop", "plan_id", "counts", "shard_set", "of"} as the plan '
                             "wrote it") from None
        limit = part.counts[part.shard_set] if 0 <= part.shard_set < len(part.counts) else sum(part.counts)
        if not (0 <= part.start < part.stop <= limit and 0 <= part.index < part.of):
            raise InputError(what, f"has the range [{part.start}, {part.stop}) outside the plan's {limit} "
                                   f"{'shards' if part.shard_set >= 0 else 'items'}", "a partition of the plan")
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
    """Items per source (the listing's size, or for a tar one streaming pass that counts them);
    shards for a shard set, which is not read."""
    counts = []
    for source in sources:
        if isinstance(source, ShardSetSource):
            counts.append(source.shard_count())
            continue
        hint = source.size_hint()
        if hint is None:
            log(f"plan: counting the items of {source.uri} (one pass over the stream)")
            hint = sum(1 for _ in source.items())
        counts.append(hint)
    return counts


def embeds_in_partitions(cfg: CurateConfig) -> bool:
    """Whether the partitions embed with a network (embed.where=partitions)."""
    return cfg.embed.where == "partitions" and cfg.embed.backbone != "layout"


def ingest_config(cfg: CurateConfig) -> dict[str, Any]:
    """The config a partition's output depends on (not the thread counts)."""
    embed = cfg.embed.model_dump(mode="json", exclude={"threads", "workers"}) if embeds_in_partitions(cfg) else None
    return {"ingest": cfg.ingest.model_dump(mode="json", exclude={"workers"}),
            "images": cfg.images.model_dump(mode="json"),
            "view_grid": cfg.dedup.view_grid, "view_scale": cfg.dedup.view_scale, "embed": embed}


Block = tuple[int, int, int]  # (shard set's source index or -1 for counted items, first, stop)


def blocks(counts: Sequence[int], shard_sets: Sequence[bool]) -> list[Block]:
    """The global order as blocks: each maximal run of counted sources (an idx range of their
    items; idx counts the counted sources' items only) and each shard set (its shards)."""
    out: list[Block] = []
    idx = 0
    for i, (count, sharded) in enumerate(zip(counts, shard_sets)):
        if sharded:
            out.append((i, 0, count))
        elif out and out[-1][0] == -1:
            out[-1] = (-1, out[-1][1], idx + count)
        else:
            out.append((-1, idx, idx + count))
        idx += 0 if sharded else count
    return [block for block in out if block[2] > block[1]]


def cut(ranges: Sequence[Block], items: int, shards: int) -> list[Block]:
    """Each block cut into pieces of `items` items or `shards` shards."""
    out = []
    for shard_set, first, stop in ranges:
        size = shards if shard_set >= 0 else items
        out += [(shard_set, start, min(start + size, stop)) for start in range(first, stop, size)]
    return out


def make_plan(source_uris: Sequence[str], sources: Sequence[Source], cfg: CurateConfig) -> Plan:
    counts = tuple(source_counts(sources))
    sharded = [isinstance(source, ShardSetSource) for source in sources]
    order = blocks(counts, sharded)
    if not order:
        raise InputError("--source " + " ".join(source_uris), "yielded no items", "at least one image")
    part = cfg.partition
    n_items = sum(stop - first for shard_set, first, stop in order if shard_set < 0)
    n_shards = sum(stop - first for shard_set, first, stop in order if shard_set >= 0)
    items = part.items or max(1, math.ceil(n_items / part.count))
    items, shards = max(items, math.ceil(n_items / part.max_count)), max(part.shards, math.ceil(n_shards / part.max_count))
    ranges = cut(order, items, shards)
    while len(ranges) > part.max_count:  # counted runs and shard sets together: larger pieces of both
        items, shards = items * 2, shards * 2
        ranges = cut(order, items, shards)
    if (part.items and items > part.items) or shards > part.shards:
        log(f"plan: partitions of {part.items or items} items and {part.shards} shards would make more than "
            f"partition.max_count={part.max_count}; cut into {len(ranges)} of {items} items or {shards} shards "
            "instead")
    digest = hashlib.sha256(json.dumps({"version": PLAN_VERSION, "sources": list(source_uris), "counts": counts,
                                        "ranges": ranges, "config": ingest_config(cfg)},
                                       sort_keys=True).encode()).hexdigest()
    plan_id = digest[:16]
    parts = tuple(Partition(i, start, stop, plan_id, counts, shard_set, len(ranges))
                  for i, (shard_set, start, stop) in enumerate(ranges))
    what = f"{n_items} items" + (f" and {n_shards} tar shards" if n_shards else "")
    log(f"plan {plan_id}: {what} in {len(parts)} partition(s)")
    return Plan(plan_id, counts, parts)


def check_counts(sources: Sequence[Source], partition: Partition) -> None:
    """A source whose listing size changed since planning would shift every later idx."""
    if len(sources) != len(partition.counts):
        raise InputError("--source", f"names {len(sources)} source(s), the plan {len(partition.counts)}",
                         "the sources the plan was made for")
    for source, count in zip(sources, partition.counts):
        sharded = isinstance(source, ShardSetSource)
        hint = source.shard_count() if sharded else source.size_hint()
        if hint is not None and hint != count:
            what = "shards" if sharded else "items"
            raise InputError(f"--source {source.uri}", f"lists {hint} {what}, the plan counted {count}",
                             "sources that do not change while they are curated")


def stored_partition(work_root: str, partition: Partition) -> Path:
    """Where `partition` is kept under `partition.work_root` (keyed by plan id)."""
    return Path(work_root) / f"plan-{partition.plan_id}" / f"part-{partition.index:05d}"


def check_complete(manifests: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The partition manifests in order, checked to be one plan's partitions, all of them."""
    ordered = sorted(manifests, key=lambda m: int(m["index"]))
    if not ordered:
        raise InputError("--partition", "no partition outputs were given", "the outputs of every partition")
    ids = {m["plan_id"] for m in ordered}
    if len(ids) != 1:
        raise InputError("--partition", f"outputs come from several plans ({', '.join(sorted(ids))})",
                         "the partitions of one plan")
    plan_id, counts = ordered[0]["plan_id"], list(ordered[0]["counts"])
    sets = {int(m["shard_set"]) for m in ordered} - {-1}
    for shard_set in [-1, *sorted(sets)]:
        what = "items" if shard_set < 0 else f"shards of source {shard_set}"
        total = (sum(c for i, c in enumerate(counts) if i not in sets) if shard_set < 0 else counts[shard_set])
        expected = 0
        for m in (m for m in ordered if int(m["shard_set"]) == shard_set):
            if int(m["start"]) != expected:
                raise InputError("--partition", f"outputs leave {what} [{expected}, {m['start']}) of plan "
                                                f"{plan_id} uncovered", "every partition of the plan")
            expected = int(m["stop"])
        if expected != total:
            raise InputError("--partition", f"outputs end at {what} {expected} of {total}", "every partition of the plan")
    indices = [int(m["index"]) for m in ordered]
    if indices != list(range(int(ordered[0]["of"]))):
        raise InputError("--partition", f"outputs are partitions {indices} of plan {plan_id}, which has "
                                        f"{ordered[0]['of']}", "every partition of the plan once")
    return ordered
