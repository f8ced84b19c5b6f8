"""The plan of one epoch: which shards each partition reads, how many of its samples go into each global
batch, and which rank reads which partitions.

A pure module: everything here is a function of the manifest's per-shard sample counts, ``seed``,
``epoch``, the number of partitions ``P``, the global batch size and (only for who reads what) the
world size, so every rank computes the same plan without talking to the others. No I/O, no torch.

The order of the samples, and which samples form global batch k, depend on (seed, epoch, P, global
batch) only: never on the number of ranks or loader workers. So a position (epoch, batch) saved by W
workers continues exactly on W' workers. The rule, for epoch ``e`` (``plan_epoch``):

1. ``B = batches_per_epoch = max(1, ceil(num_samples / global_batch))``.
2. The shards are shuffled with a seed of (seed, e), then dealt to the ``P`` partitions largest-first,
   each to the partition holding the fewest samples so far (``deal``). A partition reads its shards in
   the shuffled order, through its own shuffle buffer (the reader's, seeded by (seed, e, partition)).
3. Every partition contributes to every global batch: its samples are split evenly over the B
   batches (``even_split``), so global batch k is partition 0's k-th piece, then partition 1's, ...
4. Rank r of W reads the contiguous partitions ``owned(P, W, r)`` (P // W or P // W + 1 of them);
   its batch k is the concatenation of its partitions' k-th pieces, in partition order.

Every sample is thus planned exactly once per epoch, and every rank yields exactly B batches
numbered 0..B-1; global batch sizes differ by a few samples (at most P) from one batch to the next.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.data.errors import DataError


def derive_seed(*parts: Any) -> int:
    """A 64-bit seed from parts, identical in every process (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def batches_per_epoch(num_samples: int, global_batch: int) -> int:
    """B: the global batches per epoch (the last ones a little smaller, never empty)."""
    return max(1, math.ceil(num_samples / global_batch))


def feasible(shard_samples: Sequence[int], partitions: int, batches: int) -> bool:
    """Whether every partition gets at least ``batches`` samples under any shuffle: dealing keeps partition
    totals within one shard of each other, so the smallest is at least total - (partitions - 1) * max."""
    total, largest = sum(shard_samples), max(shard_samples, default=0)
    return len(shard_samples) >= partitions and total - (partitions - 1) * largest >= partitions * batches


def owned(partitions: int, world_size: int, rank: int) -> range:
    """The partitions rank ``rank`` of ``world_size`` reads: a contiguous block, sizes differing by one."""
    if not 1 <= world_size <= partitions:
        raise ValueError(
            f"world_size={world_size} must be between 1 and the number of data partitions ({partitions}); "
            f"a run's partitions are fixed when it starts (--data.partitions)"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in 0..world_size-1 (world_size={world_size})")
    return range(rank * partitions // world_size, (rank + 1) * partitions // world_size)


@dataclass(frozen=True)
class StreamPlan:
    """What one partition reads and contributes in one epoch (``rank``: the rank that reads it)."""

    rank: int
    partition: int
    shards: tuple[int, ...]  # manifest shard indices, in read order
    samples: int  # manifest samples in those shards
    batch_sizes: tuple[int, ...]  # (B,) planned images this partition puts into each global batch


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    batches_per_epoch: int
    world_size: int
    streams: tuple[StreamPlan, ...]  # (P,) one per partition, in partition order

    @property
    def partitions(self) -> int:
        return len(self.streams)

    def rank_streams(self, rank: int) -> tuple[StreamPlan, ...]:
        return tuple(self.streams[p] for p in owned(self.partitions, self.world_size, rank))

    def batch_sizes(self, rank: int) -> list[int]:
        """(B,) planned images of each batch of this rank (before any bad-data shortfall)."""
        return [sum(col) for col in zip(*(sp.batch_sizes for sp in self.rank_streams(rank)), strict=True)]

    def global_batch_sizes(self) -> list[int]:
        """(B,) planned images of each global batch, over all partitions."""
        return [sum(col) for col in zip(*(sp.batch_sizes for sp in self.streams), strict=True)]

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


def even_split(count: int, parts: int) -> tuple[int, ...]:
    """``count`` samples over ``parts`` batches, sizes differing by at most one. Returns (parts,)."""
    return tuple((k + 1) * count // parts - k * count // parts for k in range(parts))


def plan_epoch(
    shard_samples: Sequence[int],
    *,
    partitions: int,
    world_size: int,
    batches_per_epoch: int,
    seed: int,
    epoch: int,
) -> EpochPlan:
    """The deterministic assignment of shards and batch pieces of one epoch (the module docstring's rule)."""
    B, P = batches_per_epoch, partitions
    owned(P, world_size, 0)  # validates world_size against P
    # (num_shards,): shard indices in this epoch's order, and each shard's place in it
    order = list(range(len(shard_samples)))
    random.Random(derive_seed("shards", seed, epoch)).shuffle(order)
    position = {s: k for k, s in enumerate(order)}
    owner = [r for r in range(world_size) for _ in owned(P, world_size, r)]  # (P,) rank of each partition
    streams: list[StreamPlan] = []
    # (P, ragged): the shards of each partition, in read (shuffled) order
    for p, shards in enumerate(deal(order, shard_samples, P)):
        shards = sorted(shards, key=position.__getitem__)
        total = sum(shard_samples[i] for i in shards)
        if total < B:
            raise DataError(
                f"epoch {epoch}: partition {p} gets only {total} samples from its {len(shards)} shard(s) but "
                f"every partition must contribute to all {B} batches: the shards are too few or too uneven "
                f"for {P} partitions; write smaller shards (jobs/prepare_data.py --shard-samples) or lower "
                f"--data.partitions"
            )
        streams.append(StreamPlan(owner[p], p, tuple(shards), total, even_split(total, B)))
    return EpochPlan(epoch, B, world_size, tuple(streams))
