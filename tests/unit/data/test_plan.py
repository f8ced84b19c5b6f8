"""The plan of an epoch (pipeline.data.plan): pure maths, no storage."""

from __future__ import annotations

import collections
import random

import pytest

from pipeline.data.errors import DataError
from pipeline.data.plan import (
    batches_per_epoch,
    deal,
    derive_seed,
    even_split,
    feasible,
    owned,
    plan_epoch,
)
from tests.unit.data.datasets import UNEVEN


def planned_samples(plan, counts):
    """batch index -> the (shard, offset) samples planned for the global batch, before any shuffle
    buffer: each partition's shards in read order, cut into its pieces in index order, pieces joined
    in partition order."""
    out = collections.defaultdict(list)
    for sp in plan.streams:
        samples = [(i, k) for i in sp.shards for k in range(counts[i])]
        start = 0
        for j, n in enumerate(sp.batch_sizes):
            out[j] += samples[start : start + n]
            start += n
        assert start == len(samples)
    return dict(out)


# ------------------------------------------------------------------------------------------------
# golden values (worked by hand in the comments)


def test_derive_seed_is_stable_across_processes_and_versions():
    # blake2b of the parts' repr: a change here silently reorders every resumed run's data
    assert derive_seed("shards", 0, 0) == 8209898785725090219
    assert derive_seed("shards", 0, 1) != derive_seed("shards", 1, 0)


def test_steps_on_small_inputs():
    # largest first: 0 (4) -> bin 0; 1 (3) -> bin 1; 2 (3) -> bin 1 (3 < 4); 3 (2) -> bin 0 (tie 6/6: lower)
    assert deal([0, 1, 2, 3], [4, 3, 3, 2], 2) == [[0, 3], [1, 2]]
    assert even_split(10, 3) == (3, 3, 4) and even_split(6, 3) == (2, 2, 2) and even_split(0, 0) == ()
    assert batches_per_epoch(1617, 128) == 13 and batches_per_epoch(5, 256) == 1
    assert feasible([300, 300], 2, 10) and not feasible([300], 2, 1) and not feasible([590, 10], 2, 20)
    assert [owned(4, 2, r) for r in (0, 1)] == [range(0, 2), range(2, 4)]
    assert [len(owned(4, 3, r)) for r in range(3)] == [1, 1, 2] and owned(4, 1, 0) == range(4)
    with pytest.raises(ValueError, match="data partitions"):
        owned(4, 5, 0)


def test_golden_plan_of_uneven_shards():
    # shuffled order [3, 1, 4, 6, 0, 5, 7, 2]; dealt largest first to 4 partitions: 0 (400) p0, 6 (350)
    # p1, 2 (300) p2, 4 (250) p3, 7 (150) p3 (250 lowest), 3 (120) p2, 1 (37) p1, 5 (10) p1 -> 400, 397,
    # 420, 400 samples, read in shuffled order; each partition's samples over the 13 batches (400 = 30/31).
    # Rank 0 of 2 reads partitions 0 and 1, rank 1 partitions 2 and 3.
    plan = plan_epoch(UNEVEN, partitions=4, world_size=2, batches_per_epoch=13, seed=0, epoch=0)
    got = [(sp.rank, sp.partition, sp.shards, sp.samples) for sp in plan.streams]
    assert got == [(0, 0, (0,), 400), (0, 1, (1, 6, 5), 397), (1, 2, (3, 2), 420), (1, 3, (4, 7), 400)]
    assert plan.streams[0].batch_sizes == (30, 31, 31, 31, 30, 31, 31, 31, 30, 31, 31, 31, 31)
    assert plan.batch_sizes(0) == [60, 62, 61, 62, 60, 62, 61, 62, 60, 62, 61, 62, 62]
    assert plan.global_batch_sizes() == [122, 125, 124, 126, 122, 125, 125, 125, 122, 126, 124, 125, 126]
    assert plan.samples_before(0, 2) == 122 and plan.samples_before(1, 13) == 820
    assert plan.shards_of(0) == [0, 1, 5, 6] and plan.shards_of(1) == [2, 3, 4, 7]


def test_global_batches_do_not_depend_on_the_world_size():
    plans = {
        w: plan_epoch(UNEVEN, partitions=4, world_size=w, batches_per_epoch=13, seed=3, epoch=2) for w in (1, 2, 3, 4)
    }
    shared = planned_samples(plans[1], UNEVEN)
    for w, plan in plans.items():
        assert planned_samples(plan, UNEVEN) == shared
        assert [sum(col) for col in zip(*(plan.batch_sizes(r) for r in range(w)), strict=True)] == (
            plan.global_batch_sizes()
        )
        assert sorted(sp.partition for r in range(w) for sp in plan.rank_streams(r)) == [0, 1, 2, 3]


def test_every_sample_once_per_epoch():
    counts = UNEVEN
    for partitions, world_size, batch in [(1, 1, 64), (4, 2, 128), (3, 3, 150), (6, 4, 64)]:
        B = batches_per_epoch(sum(counts), batch)
        for epoch in range(3):
            plan = plan_epoch(
                counts, partitions=partitions, world_size=world_size, batches_per_epoch=B, seed=5, epoch=epoch
            )
            batches = planned_samples(plan, counts)
            assert sorted(batches) == list(range(B))
            seen = collections.Counter(s for samples in batches.values() for s in samples)
            assert len(seen) == sum(counts) and set(seen.values()) == {1}
            assert all(min(plan.batch_sizes(r)) >= 1 for r in range(world_size))  # never an empty batch


# ------------------------------------------------------------------------------------------------
# properties over random layouts


@pytest.mark.parametrize("partitions,world_size", [(1, 1), (2, 2), (4, 3), (4, 1), (8, 4)])
def test_plan_gives_every_rank_the_same_batches_and_every_sample_once(partitions, world_size):
    rng = random.Random(world_size * 10 + partitions)
    for trial in range(20):
        counts = [rng.randint(1, 300) for _ in range(rng.randint(partitions * 2, 40))]
        n = sum(counts)
        batch = rng.choice([8, 16, 64]) * partitions
        B = batches_per_epoch(n, batch)
        if not feasible(counts, partitions, B):
            continue  # the reader refuses such layouts up front
        plan = plan_epoch(
            counts, partitions=partitions, world_size=world_size, batches_per_epoch=B, seed=1, epoch=trial
        )
        seen = sorted(i for sp in plan.streams for i in sp.shards)
        assert seen == list(range(len(counts)))  # each shard once
        for rank in range(world_size):
            sizes = plan.batch_sizes(rank)
            assert len(sizes) == B and min(sizes) >= 1
        for sp in plan.streams:
            assert sum(sp.batch_sizes) == sp.samples == sum(counts[i] for i in sp.shards)
            assert max(sp.batch_sizes) - min(sp.batch_sizes) <= 1
        assert sum(sum(plan.batch_sizes(r)) for r in range(world_size)) == n
        again = plan_epoch(
            counts, partitions=partitions, world_size=world_size, batches_per_epoch=B, seed=1, epoch=trial
        )
        assert again == plan


def test_plan_changes_with_epoch_and_seed():
    counts = [100] * 16
    kw = dict(partitions=4, world_size=2, batches_per_epoch=25)
    a = plan_epoch(counts, seed=0, epoch=0, **kw)
    assert a != plan_epoch(counts, seed=0, epoch=1, **kw)
    assert a != plan_epoch(counts, seed=1, epoch=0, **kw)


def test_a_partition_with_too_few_samples_is_refused_naming_the_fix():
    with pytest.raises(DataError, match="--shard-samples"):
        plan_epoch([1000, 1], partitions=2, world_size=2, batches_per_epoch=10, seed=0, epoch=0)
