"""The plan of one epoch: which shards each (rank, stream) reads and which batch slots it fills.

A pure module: everything here is a function of the manifest's per-shard sample counts, ``seed``,
``epoch``, ``world_size``, the streams per rank ``S`` and the per-rank batch size, so every rank
computes the same plan without talking to the others. No I/O, no torch.

The rule, for epoch ``e`` (``plan_epoch``):

1. ``B = batches_per_epoch = max(1, ceil(num_samples / (world_size * batch_size)))``.
2. The shards are shuffled with a seed of (seed, e), then dealt to ranks largest-first, each to the
   rank holding the fewest samples so far (``deal``); a rank's shards are dealt the same way to its
   ``S`` streams (at most B and at most its shard count are used). A stream reads its shards in the
   shuffled order.
3. Each rank splits its B batch slots over its streams by the D'Hondt rule (``dhondt``: every
   non-empty stream gets one, each further slot goes to the stream with the most samples per slot),
   numbers them round-robin (``round_robin``: slot k of stream 0, slot k of stream 1, ..., then
   k + 1) and splits each stream's samples evenly over its slots (``even_split``).

Every sample is thus planned exactly once per epoch over all ranks and streams, and every rank gets
exactly B batch slots numbered 0..B-1; batch sizes differ by a sample or so between ranks and streams.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from pipeline.data.errors import DataError


def derive_seed(*parts: Any) -> int:
    """A 64-bit seed from parts, identical in every process (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def batches_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    """B: the batches every rank yields per epoch (the last ones a little smaller, never empty)."""
    return max(1, math.ceil(num_samples / (world_size * batch_size)))


def feasible(shard_samples: Sequence[int], world_size: int, batches: int) -> bool:
    """Whether every rank gets at least ``batches`` samples under any shuffle: dealing keeps rank
    totals within one shard of each other, so the smallest is at least total - (world_size - 1) * max."""
    total, largest = sum(shard_samples), max(shard_samples, default=0)
    return len(shard_samples) >= world_size and total - (world_size - 1) * largest >= world_size * batches


@dataclass(frozen=True)
class StreamPlan:
    """What one stream (rank, stream) reads and yields in one epoch."""

    rank: int
    stream: int
    shards: tuple[int, ...]  # manifest shard indices, in read order
    samples: int  # manifest samples in those shards
    batch_indices: tuple[int, ...]  # batch indices within the epoch, ascending
    batch_sizes: tuple[int, ...]  # planned images per batch (sum = samples)


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    batches_per_epoch: int
    world_size: int
    streams_per_rank: int
    streams: tuple[StreamPlan, ...]  # rank-major: rank r's streams are [r*S, (r+1)*S)

    def rank_streams(self, rank: int) -> tuple[StreamPlan, ...]:
        s = self.streams_per_rank
        return self.streams[rank * s : (rank + 1) * s]

    def batch_sizes(self, rank: int) -> list[int]:
        """Planned images of each batch index of this rank (before any bad-data shortfall)."""
        sizes = [0] * self.batches_per_epoch
        for sp in self.rank_streams(rank):
            for j, n in zip(sp.batch_indices, sp.batch_sizes, strict=True):
                sizes[j] = n
        return sizes

    def samples_before(self, rank: int, batch: int) -> int:
        """Images this rank has consumed in this epoch when ``batch`` batches have been yielded."""
        return sum(self.batch_sizes(rank)[:batch])

    def shards_of(self, rank: int) -> list[int]:
        return sorted(i for sp in self.rank_streams(rank) for i in sp.shards)


# ------------------------------------------------------------------------------------------------
# The steps


def deal(items: Sequence[int], sizes: Sequence[int], bins: int) -> list[list[int]]:
    """Balanced greedy: items largest-first (stable), each to the bin with the fewest samples so far.

    Returns (bins, ragged) items; ties go to the lower bin, so equal items keep their given order."""
    out: list[list[int]] = [[] for _ in range(bins)]
    load = [0] * bins  # (bins,) samples dealt so far
    for i in sorted(items, key=lambda i: -sizes[i]):
        b = min(range(bins), key=lambda b: (load[b], b))
        out[b].append(i)
        load[b] += sizes[i]
    return out


def dhondt(counts: Sequence[int], seats: int) -> list[int]:
    """Split ``seats`` batch slots over streams with ``counts`` samples: one per non-empty stream,
    then each next one to the stream with the most samples per slot. Returns (streams,), sum seats."""
    alloc = [1 if c > 0 else 0 for c in counts]
    heap = [(-Fraction(c, 1), s) for s, c in enumerate(counts) if c > 0]  # (-samples per slot, stream)
    heapq.heapify(heap)
    for _ in range(seats - sum(alloc)):
        _, s = heapq.heappop(heap)
        alloc[s] += 1
        heapq.heappush(heap, (-Fraction(counts[s], alloc[s]), s))
    return alloc


def round_robin(slots: Sequence[int]) -> list[list[int]]:
    """Number the slots of every stream round-robin: slot k of stream 0, of stream 1, ..., then k + 1.

    Returns (streams, slots[s]) batch indices, together exactly 0..sum(slots)-1, each row ascending."""
    indices: list[list[int]] = [[] for _ in slots]
    j = 0
    for k in range(max(slots, default=0)):
        for s, n in enumerate(slots):
            if k < n:
                indices[s].append(j)
                j += 1
    return indices


def even_split(count: int, parts: int) -> tuple[int, ...]:
    """``count`` samples over ``parts`` batches, sizes differing by at most one. Returns (parts,)."""
    return tuple((k + 1) * count // parts - k * count // parts for k in range(parts))


def plan_epoch(
    shard_samples: Sequence[int],
    *,
    world_size: int,
    streams_per_rank: int,
    batches_per_epoch: int,
    seed: int,
    epoch: int,
) -> EpochPlan:
    """The deterministic assignment of shards and batch slots of one epoch (the module docstring's rule)."""
    B, S = batches_per_epoch, streams_per_rank
    # (num_shards,): shard indices in this epoch's order, and each shard's place in it
    order = list(range(len(shard_samples)))
    random.Random(derive_seed("shards", seed, epoch)).shuffle(order)
    position = {s: k for k, s in enumerate(order)}
    streams: list[StreamPlan] = []
    # (world_size, ragged): the shards of each rank
    for rank, shards in enumerate(deal(order, shard_samples, world_size)):
        total = sum(shard_samples[i] for i in shards)
        if total < B:
            raise DataError(
                f"epoch {epoch}: rank {rank} gets only {total} samples from its {len(shards)} shard(s) but "
                f"every rank must yield {B} batches: the shards are too few or too uneven for "
                f"world_size={world_size}; write smaller shards (jobs/prepare_data.py --shard-samples)"
            )
        used = max(1, min(S, B, len(shards)))
        # (S, ragged): the shards of each stream, in read (shuffled) order; streams past `used` are empty
        groups = deal(shards, shard_samples, used) + [[] for _ in range(S - used)]
        groups = [sorted(g, key=position.__getitem__) for g in groups]
        counts = [sum(shard_samples[i] for i in g) for g in groups]  # (S,) samples per stream
        slots = dhondt(counts, B)  # (S,) batch slots per stream, sum B
        indices = round_robin(slots)  # (S, slots[s]) batch indices, together 0..B-1
        for s, g in enumerate(groups):
            sizes = even_split(counts[s], slots[s])  # (slots[s],) images per batch, sum counts[s]
            streams.append(StreamPlan(rank, s, tuple(g), counts[s], tuple(indices[s]), sizes))
    return EpochPlan(epoch, B, world_size, S, tuple(streams))
