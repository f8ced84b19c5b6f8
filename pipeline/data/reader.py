"""Streaming reader of WebDataset shards for DDP training: equal batch counts, exact epochs, resumable,
and the same global batches whatever the number of ranks.

Trainer-facing API (see docs/data.md)::

    reader = ShardReader(cfg.data, cfg.storage, split="train", rank=rank, world_size=world,
                         batch_size=global_batch, seed=cfg.train.seed, device=device.type)
    reader.batches_per_epoch            # the same on every rank, whatever the world size
    for batch in reader.iterate(epoch, start_batch):   # Batch(images, labels, keys, epoch, index, ...)
        ...

Each epoch follows its plan (``pipeline.data.plan``): the shards are dealt to ``data.partitions``
partitions, each read through its own shuffle buffer (``data.shuffle_buffer / P`` samples, seeded by
(seed, e, partition)), and global batch k is every partition's k-th piece. A rank reads whole
partitions; its partitions are spread over its DataLoader workers (or read in the process itself
with 0 workers), and the main process joins the pieces of each index in partition order, so
``iterate`` yields indices start_batch..B-1 in order, on every rank. Flips and refills are seeded by
(seed, e, partition, k) too: nothing depends on the world size or the loader workers.

Every training image is thus yielded exactly once per epoch over all ranks and workers, and every rank
yields exactly B batches. Resuming at (e, start_batch) replays the partitions' raw bytes up to that
point without decoding them, so the batches equal those of an uninterrupted pass (same images, same
order, same flips) as long as the inputs of the plan and the data are unchanged, on any world size.

Bad data is skipped and counted by ``pipeline.data.shards``: in ``Batch.skipped`` of the batch being
assembled when it was found, described in ``Batch.errors``. A stream that comes up short still yields
all its batches, filling them with re-drawn copies of samples it read earlier this epoch
(``Batch.refilled`` counts them). ``strict=True`` raises a ShardError naming the shard URL instead.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.errors import DataError, ManifestError
from pipeline.data.manifest import Manifest, check_matches, open_manifest
from pipeline.data.plan import EpochPlan, StreamPlan, batches_per_epoch, derive_seed, feasible, owned, plan_epoch
from pipeline.data.shards import RawSample, Shards, ShardSpec

REFILL_POOL = 512  # recently read samples a short stream re-draws from
REPLACE_TRIES = 8  # draws to replace one undecodable sample
AHEAD = 2  # stream(): start the next epoch's DataLoader this many batches before the end of an epoch


@dataclass
class Batch:
    """One batch of one rank. ``images`` float32 (n, C, H, W) in [-1, 1]; ``labels`` int64 (n,)."""

    images: torch.Tensor
    labels: torch.Tensor
    keys: tuple[str, ...]  # sample keys (a refilled image repeats a key)
    epoch: int
    index: int  # batch index within the epoch, 0 .. batches_per_epoch - 1
    parts: tuple[int, ...] = ()  # the partitions whose pieces these are, in order
    part_sizes: tuple[int, ...] = ()  # images of each piece (images.split(part_sizes) gives them)
    global_size: int = 0  # planned images of this global batch over all ranks
    skipped: int = 0  # samples lost to bad data while this batch was assembled (see module doc)
    refilled: int = 0  # images in this batch that are re-drawn copies standing in for lost ones
    errors: tuple[str, ...] = field(default_factory=tuple)  # what was skipped, and why

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class _Options:
    """What a stream needs besides its plan (picklable: DataLoader workers get a copy)."""

    shards: ShardSpec
    shuffle_buffer: int
    hflip: bool
    seed: int


class _Stream:
    """One partition of one epoch: raw samples -> shuffle buffer -> decoded batch pieces."""

    def __init__(self, options: _Options, plan: StreamPlan, epoch: int) -> None:
        self.options = options
        self.plan = plan
        self.epoch = epoch
        self.shards = Shards(options.shards)

    def _make_batch(self, j: int, chosen: list[RawSample], size: int, pool: deque[RawSample]) -> Batch:
        o, shards = self.options, self.shards
        rng = random.Random(derive_seed("refill", o.seed, self.epoch, self.plan.partition, j))
        crops = random.Random(derive_seed("crop", o.seed, self.epoch, self.plan.partition, j))
        arrays: list[np.ndarray] = []
        labels: list[int] = []
        keys: list[str] = []
        refilled = 0

        def decode_pool_item() -> bool:
            for _ in range(REPLACE_TRIES):
                if not pool:
                    pool.extend(shards.borrow(self.plan.shards))
                    if not pool:
                        return False
                raw = pool[rng.randrange(len(pool))]
                out = shards.decode(raw, crops)
                if not isinstance(out, str):
                    arrays.append(out[0])
                    labels.append(out[1])
                    keys.append(raw.key)
                    return True
            return False

        for raw in chosen:
            out = shards.decode(raw, crops)
            if isinstance(out, str):
                shards.bad(1, out, raw.url)
                refilled += decode_pool_item()
            else:
                arrays.append(out[0])
                labels.append(out[1])
                keys.append(raw.key)
        for _ in range(size - len(chosen)):
            refilled += decode_pool_item()
        if not arrays:
            raise DataError(
                f"epoch {self.epoch}, batch {j}: no decodable sample in this stream's shards "
                f"{[o.shards.urls[i] for i in self.plan.shards]} or the samples it could borrow"
            )
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()
        if o.hflip:
            flip_rng = np.random.default_rng(derive_seed("flip", o.seed, self.epoch, self.plan.partition, j))
            mask = torch.from_numpy(flip_rng.random(len(arrays)) < 0.5)
            x[mask] = x[mask].flip(-1)
        skipped, messages = shards.take_events()
        return Batch(
            images=x,
            labels=torch.tensor(labels, dtype=torch.int64),
            keys=tuple(keys),
            epoch=self.epoch,
            index=j,
            parts=(self.plan.partition,),
            part_sizes=(len(arrays),),
            skipped=skipped,
            refilled=refilled,
            errors=messages,
        )

    def batches(self, start_batch: int) -> Iterator[Batch]:
        o, plan = self.options, self.plan
        rng = random.Random(derive_seed("shuffle", o.seed, self.epoch, plan.partition))
        capacity = max(1, o.shuffle_buffer)
        shuffle = o.shuffle_buffer > 1
        raw = self.shards.samples(plan.shards)
        buf: list[RawSample] = []
        exhausted = False
        pool: deque[RawSample] = deque(maxlen=max(REFILL_POOL, *plan.batch_sizes))
        for j, size in enumerate(plan.batch_sizes):
            chosen: list[RawSample] = []
            while len(chosen) < size:
                while not exhausted and len(buf) < capacity:
                    try:
                        buf.append(next(raw))
                    except StopIteration:
                        exhausted = True
                if not buf:
                    break
                if shuffle:
                    k = rng.randrange(len(buf))
                    buf[k], buf[-1] = buf[-1], buf[k]
                item = buf.pop() if shuffle else buf.pop(0)
                chosen.append(item)
                pool.append(item)
            if j < start_batch:
                self.shards.take_events()  # events of batches before the resume point belong to them
                continue
            yield self._make_batch(j, chosen, size, pool)


class _EpochDataset(IterableDataset):
    def __init__(self, options: _Options, plan: EpochPlan, rank: int, start_batch: int) -> None:
        self.options = options
        self.plan = plan
        self.rank = rank
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[Batch]:
        streams = self.plan.rank_streams(self.rank)
        info = get_worker_info()
        if info is not None:
            streams = streams[info.id :: info.num_workers]
        gens = [_Stream(self.options, sp, self.plan.epoch).batches(self.start_batch) for sp in streams]
        if len(gens) == 1:
            yield from gens[0]
        else:
            yield from heapq.merge(*gens, key=lambda b: (b.index, b.parts))


def _identity(x: Any) -> Any:
    return x


class ShardReader:
    """Streams one split's shards to one DDP rank. See the module docstring for the exact rule.

    Args:
        data: DataConfig (url, image_size and channels checked against the manifest,
            shuffle_buffer, hflip, loader_workers, strict).
        storage: StorageConfig (or a dict of boto3 client keywords) for s3:// URLs.
        split: "train" or "eval" (a sub-directory of ``data.url``).
        rank, world_size: this process's DDP rank and the number of ranks (at most the partitions).
        batch_size: the nominal global batch over all ranks; actual sizes differ by a few samples.
        seed: seeds the shard order, shuffle buffers, flips and refills (with the epoch).
        partitions: the canonical partitions of the data order; default ``data.partitions`` (at most
            one per shard).
        manifest: an already-read manifest (skips reading it).
        device: the kind of device the batches go to; ``data.workers_for(device)`` resolves
            ``loader_workers="auto"`` (exposed as ``self.loader_workers``).
    """

    def __init__(
        self,
        data: Any,
        storage: Any = None,
        *,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        batch_size: int,
        seed: int = 0,
        manifest: Manifest | None = None,
        device: Literal["cpu", "cuda"] = "cpu",
        partitions: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.data = data
        self.split = split
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.seed = seed
        self.manifest = manifest or open_manifest(data.url, storage, split)
        check_matches(self.manifest, image_size=data.image_size, channels=data.channels, resize=data.resize)
        m = self.manifest
        if m.num_samples == 0 or not m.shards:
            raise ManifestError(f"dataset {m.url} has no samples", url=m.url)
        counts = [s.samples for s in m.shards]
        # A dataset of fewer shards than partitions has one partition per shard (still fixed by the data).
        self.partitions = min(partitions or data.partitions, len(counts))
        self.owned = owned(self.partitions, world_size, rank)  # validates rank and world_size
        self.loader_workers = data.workers_for(device)
        self.batches_per_epoch = batches_per_epoch(m.num_samples, batch_size)
        if not feasible(counts, self.partitions, self.batches_per_epoch):
            raise DataError(
                f"dataset {m.url} has {len(counts)} shard(s) of up to {max(counts)} samples "
                f"({m.num_samples} in all): too few or too large to give each of {self.partitions} data "
                f"partitions a piece of all {self.batches_per_epoch} batches of ~{batch_size}; write smaller "
                f"shards (jobs/prepare_data.py --shard-samples) or lower --data.partitions",
                url=m.url,
            )
        # The buffer is split over the partitions so that a rank holding all of them holds data.shuffle_buffer.
        buffer = -(-data.shuffle_buffer // self.partitions)
        spec = ShardSpec.from_manifest(
            m,
            storage,
            strict=data.strict,
            image_size=data.image_size,
            channels=data.channels,
            resize=data.resize,
            label_key=data.label_key,
        )
        self._options = _Options(spec, buffer, data.hflip, seed)
        self._position = (0, 0)

    # -- layout ---------------------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    def plan(self, epoch: int) -> EpochPlan:
        """The shard/batch assignment of an epoch (identical on every rank)."""
        return plan_epoch(
            self._options.shards.counts,
            partitions=self.partitions,
            world_size=self.world_size,
            batches_per_epoch=self.batches_per_epoch,
            seed=self.seed,
            epoch=epoch,
        )

    def layout(self) -> dict[str, Any]:
        """The inputs of the rule; a position can only be resumed exactly under the same layout (the world
        size and the loader workers are not part of it)."""
        return {
            "manifest": self.manifest.digest,
            "partitions": self.partitions,
            "batch_size": self.batch_size,
            "shuffle_buffer": self.data.shuffle_buffer,
            "seed": self.seed,
        }

    # -- position -------------------------------------------------------------------------------

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, batches of that epoch already yielded); (e, B) is normalised to (e + 1, 0)."""
        return self._position

    def state_dict(self) -> dict[str, Any]:
        epoch, batch = self._position
        return {"epoch": epoch, "batch": batch, "layout": self.layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; raises ValueError if the layout changed (not exact)."""
        saved = state.get("layout")
        if saved is not None and saved != self.layout():
            diff = {k: (saved.get(k), v) for k, v in self.layout().items() if saved.get(k) != v}
            raise ValueError(
                f"cannot resume the data stream exactly: its layout changed (saved, now): {diff}; "
                f"start a new epoch instead (iterate(epoch + 1))"
            )
        self._set_position(int(state["epoch"]), int(state["batch"]))

    def _set_position(self, epoch: int, batch: int) -> None:
        if batch >= self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        self._position = (epoch, batch)

    # -- iteration ------------------------------------------------------------------------------

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches ``start_batch`` .. ``batches_per_epoch - 1`` of ``epoch``, in index order."""
        B = self.batches_per_epoch
        if epoch < 0 or not 0 <= start_batch <= B:
            raise ValueError(f"epoch={epoch}, start_batch={start_batch}: need epoch >= 0 and 0 <= start_batch <= {B}")
        self._set_position(epoch, start_batch)
        if start_batch < B:
            yield from self._ordered(self._open(epoch, start_batch), epoch, start_batch)

    def stream(self) -> Iterator[Batch]:
        """Batches from the current ``position`` on, epoch after epoch, forever.

        With DataLoader workers, the next epoch's workers start ``AHEAD`` batches before the end of
        an epoch, so the epoch boundary costs the trainer (almost) no start-up wait.
        """
        ahead: tuple[tuple[int, int], Iterator[Batch]] | None = None
        early = max(0, self.batches_per_epoch - 1 - AHEAD)
        try:
            while True:
                epoch, batch = self._position
                if ahead is not None and ahead[0] == (epoch, batch):
                    source = ahead[1]
                else:
                    if ahead is not None:
                        _close(ahead[1])
                    source = self._open(epoch, batch)
                ahead = None
                for out in self._ordered(source, epoch, batch):
                    if out.index >= early and ahead is None and self.loader_workers > 0:
                        ahead = ((epoch + 1, 0), self._open(epoch + 1, 0))
                    yield out
        finally:
            if ahead is not None:
                _close(ahead[1])

    def _open(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        """The unordered batches of one epoch; with workers, they start reading at once."""
        dataset = _EpochDataset(self._options, self.plan(epoch), self.rank, start_batch)
        workers = self.loader_workers
        if workers == 0:
            return iter(dataset)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            collate_fn=_identity,
            persistent_workers=False,
            prefetch_factor=2,
            # own generator: creating the iterator must not consume the trainer's global RNG
            generator=torch.Generator().manual_seed(derive_seed("loader", self.seed, epoch) % (1 << 63)),
        )
        return iter(loader)

    def _ordered(self, source: Iterator[Batch], epoch: int, start_batch: int) -> Iterator[Batch]:
        pending: dict[int, list[Batch]] = {}  # batch index -> the pieces of it read so far
        expect, parts = start_batch, len(self.owned)
        sizes = self.plan(epoch).global_batch_sizes()
        try:
            for piece in source:
                pending.setdefault(piece.index, []).append(piece)
                while len(pending.get(expect, ())) == parts:
                    out = _join(pending.pop(expect), sizes[expect])
                    expect += 1
                    self._set_position(epoch, expect)
                    yield out
        finally:
            _close(source)
        if expect != self.batches_per_epoch:
            raise DataError(
                f"internal error: epoch {epoch} ended after batch {expect - 1} of {self.batches_per_epoch} "
                f"on rank {self.rank}"
            )


def _join(pieces: list[Batch], global_size: int) -> Batch:
    """One rank's batch from its partitions' pieces of one index, in partition order."""
    pieces = sorted(pieces, key=lambda b: b.parts)
    first = pieces[0]
    return Batch(
        images=torch.cat([b.images for b in pieces]) if len(pieces) > 1 else first.images,
        labels=torch.cat([b.labels for b in pieces]) if len(pieces) > 1 else first.labels,
        keys=tuple(k for b in pieces for k in b.keys),
        epoch=first.epoch,
        index=first.index,
        parts=tuple(p for b in pieces for p in b.parts),
        part_sizes=tuple(n for b in pieces for n in b.part_sizes),
        global_size=global_size,
        skipped=sum(b.skipped for b in pieces),
        refilled=sum(b.refilled for b in pieces),
        errors=tuple(e for b in pieces for e in b.errors),
    )


def _close(source: Iterator[Batch]) -> None:
    shutdown = getattr(source, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    elif hasattr(source, "close"):
        source.close()
