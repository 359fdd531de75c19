"""The training stream: `ShardStream`, one rank's shuffled, resampled or single-epoch sequence of
decoded samples, split between DataLoader workers and resumable at an exact sample position.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch.utils.data

from gramline.data.reader import count_samples, decode_image, image_member, read_shard
from gramline.errors import InputError

StreamMode = Literal["shuffle", "resample", "epoch"]
MIN_SHARDS_PER_RANK = 2
"""Ranks get whole shards when every rank gets at least this many; otherwise every rank reads all
shards and keeps every world_size-th sample."""


class ShardStream(torch.utils.data.IterableDataset):
    """Decoded training samples for one rank: dicts(key, image PIL RGB, label, caption, index).

    The rank's sample sequence is a pure function of (seed, mode, rank, world_size, shards): epoch
    e takes a seeded shard order (a permutation, or draws with replacement for "resample"), gives
    this rank its share (whole shards, or every world_size-th sample when shards are few), and
    shuffles locally by sorting on position + uniform(0, shuffle_buffer) jitter. "shuffle" and
    "resample" run forever (epoch e reshuffles with seed and e); "epoch" is one pass.

    `index` is the sample's position in the rank's sequence. A stream built with
    `start_position=N` yields exactly positions N, N+1, ... of the same sequence, so the training loop
    stores "samples consumed by this rank" in its checkpoint and resumes from it.

    DataLoader workers: worker i (of W) yields the blocks of `batch_size` consecutive positions
    numbered i, i+W, i+2W, ... counted from start_position. With the DataLoader's `batch_size`
    equal to this `batch_size` (1 when the DataLoader does not batch), the DataLoader returns the
    rank's sequence in order, whatever the number of workers. Each worker reads only the samples
    it yields (others are skipped at the tar-member level, never decoded). With
    `decode_images=False` a sample's image stays its encoded bytes, for a transform that decodes it
    itself (the training augmentation decodes a JPEG only at the size its crops need).

    `share=(i, n)` makes this stream one of n readers of the same sequence: it yields the blocks
    i, i+n, i+2n, ... (then split between its workers as above). With world_size=1 and one reader
    per rank, rank r's batch at step s is the r-th slice of the global batch s, whatever the number
    of ranks (distillation uses this so that every process layout sees the same global batches).
    """

    def __init__(
        self,
        shard_urls: list[str],
        seed: int,
        mode: StreamMode = "shuffle",
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 512,
        *,
        batch_size: int = 1,
        start_position: int = 0,
        shard_counts: list[int] | None = None,
        transform: Callable[[dict], Any] | None = None,
        share: tuple[int, int] = (0, 1),
        decode_images: bool = True,
    ) -> None:
        super().__init__()
        if not shard_urls:
            raise InputError("shard_urls", "is empty", "at least one shard")
        if mode not in ("shuffle", "resample", "epoch"):
            raise InputError("stream mode", f"is {mode!r}", "'shuffle', 'resample' or 'epoch'")
        if not 0 <= rank < world_size:
            raise InputError("rank", f"is {rank} with world_size {world_size}", "0 <= rank < world_size")
        for name, value, low in (("shuffle_buffer", shuffle_buffer, 0), ("batch_size", batch_size, 1),
                                 ("start_position", start_position, 0)):
            if int(value) < low:
                raise InputError(name, f"is {value}", f"an integer >= {low}")
        self.urls = list(shard_urls)
        self.seed, self.mode, self.rank, self.world_size = int(seed), mode, rank, world_size
        self.shuffle_buffer, self.batch_size, self.start_position = shuffle_buffer, batch_size, start_position
        self.transform = transform
        self.decode_images = decode_images
        if not 0 <= share[0] < share[1]:
            raise InputError("share", f"is {share}", "(i, n) with 0 <= i < n")
        self.share = (int(share[0]), int(share[1]))
        counts = list(shard_counts) if shard_counts is not None else [count_samples(u) for u in self.urls]
        if len(counts) != len(self.urls):
            raise InputError("shard_counts", f"has {len(counts)} entries for {len(self.urls)} shards",
                             "one count per shard")
        for url, n in zip(self.urls, counts):
            if n < 1:
                raise InputError(f"shard {url}", "holds no samples", "at least one sample per shard")
        self.counts = np.asarray(counts, dtype=np.int64)
        self.shard_split = len(self.urls) >= MIN_SHARDS_PER_RANK * world_size
        if not self.shard_split and int(self.counts.sum()) < world_size:
            raise InputError("dataset", f"has {int(self.counts.sum())} samples for {world_size} ranks",
                             "at least one sample per rank")

    # -- the rank's sequence -------------------------------------------------------------------

    def _shard_order(self, epoch: int) -> np.ndarray:
        n = len(self.urls)
        if self.mode == "epoch" and self.shuffle_buffer == 0:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, epoch, 0])  # the same on every rank
        return rng.integers(0, n, n) if self.mode == "resample" else rng.permutation(n)

    def _plan(self, epoch: int) -> tuple[np.ndarray, int, int]:
        """This rank's shards for `epoch`, and (M, m): keep the k-th sample of their concatenation
        when k % M == m."""
        order = self._shard_order(epoch)
        if self.shard_split:
            return order[self.rank::self.world_size], 1, 0
        return order, self.world_size, self.rank

    def epoch_length(self, epoch: int = 0) -> int:
        """Samples this rank yields in `epoch`."""
        shards, modulus, offset = self._plan(epoch)
        total = int(self.counts[shards].sum())
        return len(range(offset, total, modulus))

    def _epoch_sequence(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(block, ordinal) of every input of this rank's epoch, in reading order, and the output
        order as input positions. Block j is the j-th shard of the plan (a shard can occur twice
        when resampling)."""
        shards, modulus, offset = self._plan(epoch)
        blocks, ordinals, base = [], [], 0
        for j, s in enumerate(shards):
            n = int(self.counts[s])
            o = np.arange((offset - base) % modulus, n, modulus)
            blocks.append(np.full(o.size, j))
            ordinals.append(o)
            base += n
        block = np.concatenate(blocks)
        ordinal = np.concatenate(ordinals)
        order = np.arange(block.size)
        if self.shuffle_buffer > 0 and block.size:
            rng = np.random.default_rng([self.seed, epoch, self.rank, 1])
            order = np.argsort(order + rng.uniform(0, self.shuffle_buffer, order.size), kind="stable")
        return block, ordinal, order, shards

    def loader(self, num_workers: int = 0, **kwargs: Any) -> torch.utils.data.DataLoader:
        """A DataLoader over this stream with the matching batch size (see the class docstring)."""
        return torch.utils.data.DataLoader(self, batch_size=self.batch_size, num_workers=num_workers, **kwargs)

    # -- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        start = self.start_position
        epoch, epoch_start = 0, 0
        while True:
            length = self.epoch_length(epoch)
            if epoch_start + length > start or self.mode == "epoch":
                break
            epoch_start += length
            epoch += 1
        while True:
            length = self.epoch_length(epoch)
            positions = np.arange(max(start, epoch_start), epoch_start + length)
            block = (positions - start) // self.batch_size
            reader, readers = self.share
            mine = positions[(block % readers == reader) & ((block // readers) % workers == worker)]
            if mine.size:
                yield from self._yield(epoch, mine - epoch_start, epoch_start)
            if self.mode == "epoch":
                return
            epoch_start += length
            epoch += 1

    def _yield(self, epoch: int, outputs: np.ndarray, epoch_start: int) -> Iterator[Any]:
        block, ordinal, order, shards = self._epoch_sequence(epoch)
        needed = order[outputs]  # input positions, in output order
        reader = self._read_inputs(np.sort(needed), block, ordinal, shards)
        stash: dict[int, dict[str, Any]] = {}
        for out_pos, q in zip(outputs.tolist(), needed.tolist()):
            while q not in stash:
                got, raw = next(reader)
                stash[got] = raw
            sample = self._decode(stash.pop(q), epoch_start + out_pos)
            yield self.transform(sample) if self.transform is not None else sample

    def _read_inputs(self, inputs: np.ndarray, block: np.ndarray, ordinal: np.ndarray,
                     shards: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
        """(input position, raw sample) for the sorted `inputs`, reading each shard once."""
        blocks = block[inputs]
        bounds = np.flatnonzero(np.diff(blocks)) + 1
        for group in np.split(inputs, bounds):
            url = self.urls[int(shards[block[group[0]]])]
            want = dict(zip(ordinal[group].tolist(), group.tolist()))
            last = int(ordinal[group[-1]])
            found = 0
            samples = read_shard(url, wanted=want.__contains__)
            try:
                for o, raw in samples:
                    yield want[o], raw
                    found += 1
                    if o == last:
                        break
            finally:
                samples.close()  # type: ignore[attr-defined]  # a generator: closes the shard now
            if found != len(want):
                raise InputError(f"shard {url}", f"has fewer samples than the {len(want)} expected",
                                 "the sample count recorded in the manifest")

    def _decode(self, raw: dict[str, Any], index: int) -> dict[str, Any]:
        meta = json.loads(raw["json"]) if "json" in raw else {}
        member = image_member(raw)
        return {"key": raw["__key__"], "image": decode_image(member) if self.decode_images else member,
                "label": int(meta.get("label", -1)),
                "caption": raw["txt"].decode() if "txt" in raw else None, "index": int(index)}
