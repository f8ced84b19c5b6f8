"""The same optimisation on any number of workers: how a rank turns its share of a global batch into
micro-batches, and how a change of world size shows in the MLflow run.

The reader gives every rank whole data partitions, so the global batch k and its samples do not depend
on the world size W (``pipeline.data.plan``). The step keeps the rest independent of W too:

- each partition's piece of the batch gets its timesteps and noise from a generator seeded by
  (seed, step, partition), so a sample is noised the same on any rank;
- a rank's loss sum is divided by ``global images / W`` and DDP averages over the W ranks, so the
  gradient is the mean over the global batch even when the ranks hold different shares;
- a rank holding ``n`` of the ``P`` partitions splits its share into
  ``grad_accum * ceil(max_workers * n / P)`` micro-batches: with fewer workers than the most the run
  was configured for, the missing share is made up by gradient accumulation at the same micro-batch
  size, so memory per step stays what it was on the full group.

The learning rate follows the images seen, the EMA the optimizer steps: neither depends on W. What
remains is floating-point reduction order (and dropout masks, drawn from each rank's own generator:
presets with dropout give statistically, not bitwise, equivalent runs across world sizes).
"""

from __future__ import annotations

import math

from pipeline.data.plan import derive_seed
from pipeline.train.state import TrainState

WORLD_SIZE_METRIC = "train/world_size"
RESIZE_TAG_PREFIX = "elastic.resize."


def micro_batches_for(parts: int, partitions: int, max_workers: int, grad_accum: int) -> int:
    """Micro-batches per step of a rank that reads ``parts`` of the ``partitions``."""
    return grad_accum * max(1, math.ceil(max_workers * parts / partitions))


def step_inputs(
    state: TrainState, batch, *, world_size: int, partitions: int, max_workers: int, grad_accum: int
) -> dict:
    """``TrainState.train_step`` keywords for this rank's ``batch`` (a reader Batch) at the current step."""
    x = batch.images
    seeds = [derive_seed("noise", state.seed, state.step_count, p) % (1 << 63) for p in batch.parts]
    t, noise = state.keyed_draws(x.shape, list(batch.part_sizes), seeds)
    n = micro_batches_for(len(batch.parts), partitions, max_workers, grad_accum)
    split = zip(x.tensor_split(n), t.tensor_split(n), noise.tensor_split(n), strict=True)
    chunks = [(xs, (ts, es)) for xs, ts, es in split if len(xs)]
    return {
        "micro_batches": [xs for xs, _ in chunks],
        "draws": [d for _, d in chunks],
        "denominator": batch.global_size / world_size,
    }


def log_world_size(tracker, world_size: int, images_seen: int, previous: int | None, checkpoint: str | None) -> None:
    """Rank 0, at every start of the worker group: the world size as a metric over images seen, and a
    tag for each resize (``elastic.resize.<images>``: old -> new and the checkpoint it resumed from)."""
    if tracker is None:
        return
    # After a restart the tracker drops steps the run already holds (the images redone since the checkpoint),
    # and the restored checkpoint's own step holds the size of the group that wrote it: the new size is
    # logged past both, at the first step whose metrics come from the new group.
    step = max(images_seen + (1 if checkpoint else 0), getattr(tracker, "min_step", -1) + 1)
    tracker.log_metrics({WORLD_SIZE_METRIC: float(world_size)}, step=step)
    if previous is not None and previous != world_size:
        where = f" from {checkpoint.rstrip('/').rsplit('/', 1)[-1]}" if checkpoint else ""
        tracker.set_tags(
            {
                f"{RESIZE_TAG_PREFIX}{images_seen}": f"{previous} -> {world_size} workers at {images_seen:,} images"
                f" (resumed{where})"
            }
        )
