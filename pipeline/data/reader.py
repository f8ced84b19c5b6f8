"""Streaming reader of WebDataset shards for DDP training: equal batch counts, exact epochs, resumable.

Trainer-facing API (see docs/data.md)::

    reader = ShardReader(cfg.data, cfg.storage, split="train", rank=rank, world_size=world,
                         batch_size=per_rank_batch, seed=cfg.train.seed)
    reader.batches_per_epoch            # the same on every rank
    for batch in reader.iterate(epoch, start_batch):   # Batch(images, labels, keys, epoch, index, ...)
        ...

The rule, for epoch ``e`` (all of it a pure function of the manifest, ``seed``, ``e``, ``world_size``,
``batch_size`` and ``data.loader_workers``, computed identically on every rank; see ``plan_epoch``):

1. ``B = batches_per_epoch = max(1, ceil(num_samples / (world_size * batch_size)))``.
2. The shards are shuffled with a seed of (seed, e), then dealt to ranks largest-first, each to the
   rank holding the fewest samples so far (balanced greedy); a rank's shards are dealt the same way
   to its ``S = max(1, loader_workers)`` streams (at most B and at most its shard count are used).
   A stream reads its shards in the shuffled order.
3. Each rank splits its B batch slots over its streams by the D'Hondt rule (every non-empty stream
   gets one, each further slot goes to the stream with the most samples per slot), numbers them
   round-robin (slot k of stream 0, slot k of stream 1, ..., then k + 1) and splits each stream's
   samples evenly over its slots: batch sizes differ by a sample or so between ranks and streams.
4. Stream s of rank r is read by DataLoader worker ``s % num_workers`` through a shuffle buffer of
   ``data.shuffle_buffer`` samples seeded by (seed, e, r, s). The main process re-orders batches by
   index, so ``iterate`` yields indices start_batch..B-1 in order, on every rank.

Every training image is thus yielded exactly once per epoch over all ranks and workers, and every rank
yields exactly B batches. Resuming at (e, start_batch) replays the streams' raw bytes up to that point
without decoding them, so the batches equal those of an uninterrupted pass (same images, same order,
same flips) as long as the inputs of the rule and the data are unchanged.

Bad data (missing shard, truncated or garbage tar, undecodable image or label): skipped, counted in
``Batch.skipped`` of the batch being assembled when it was found, described in ``Batch.errors`` and
logged. A stream that comes up short still yields all its batches, filling them with re-drawn copies
of samples it read earlier this epoch (``Batch.refilled`` counts them). ``strict=True`` raises a
ShardError naming the shard URL instead. Wrong keys, a missing bucket or an unreachable endpoint are
never skipped: they raise at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import io
import logging
import math
import random
import re
import tarfile
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.errors import (
    DataError,
    ManifestError,
    MissingBucketError,
    ShardError,
    StorageAuthError,
    StorageUnreachableError,
)
from pipeline.data.manifest import Manifest, check_matches, open_manifest
from pipeline.data.storage import open_read, storage_kwargs

log = logging.getLogger("pipeline.data")

IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}
WANTED = {*IMAGE_FORMATS, "cls"}
MAX_MEMBER_BYTES = 64 << 20  # larger members are treated as corrupt (never read into memory)
MODES = {1: "L", 3: "RGB", 4: "RGBA"}
REFILL_POOL = 512  # recently read samples a short stream re-draws from
REPLACE_TRIES = 8  # draws to replace one undecodable sample
MAX_MESSAGES = 20  # messages kept per batch
AHEAD = 2  # stream(): start the next epoch's DataLoader this many batches before the end of an epoch
FATAL = (StorageAuthError, MissingBucketError, StorageUnreachableError)
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def derive_seed(*parts: Any) -> int:
    """A 64-bit seed from parts, identical in every process (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


# ------------------------------------------------------------------------------------------------
# The plan of one epoch


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


def _greedy(items: Sequence[int], sizes: Sequence[int], bins: int) -> list[list[int]]:
    """Balanced greedy: items largest-first (stable), each to the bin with the fewest samples."""
    out: list[list[int]] = [[] for _ in range(bins)]
    load = [0] * bins
    for i in sorted(items, key=lambda i: -sizes[i]):
        b = min(range(bins), key=lambda b: (load[b], b))
        out[b].append(i)
        load[b] += sizes[i]
    return out


def _dhondt(counts: Sequence[int], seats: int) -> list[int]:
    """Split ``seats`` batches over streams: 1 per non-empty stream, then by largest count/seats."""
    alloc = [1 if c > 0 else 0 for c in counts]
    heap = [(-Fraction(c, 1), s) for s, c in enumerate(counts) if c > 0]
    heapq.heapify(heap)
    for _ in range(seats - sum(alloc)):
        _, s = heapq.heappop(heap)
        alloc[s] += 1
        heapq.heappush(heap, (-Fraction(counts[s], alloc[s]), s))
    return alloc


def plan_epoch(
    shard_samples: Sequence[int],
    *,
    world_size: int,
    streams_per_rank: int,
    batches_per_epoch: int,
    seed: int,
    epoch: int,
) -> EpochPlan:
    """The deterministic assignment of shards and batch slots of one epoch (module docstring)."""
    n = len(shard_samples)
    B = batches_per_epoch
    order = list(range(n))
    random.Random(derive_seed("shards", seed, epoch)).shuffle(order)
    position = {s: k for k, s in enumerate(order)}
    streams: list[StreamPlan] = []
    for rank, shards in enumerate(_greedy(order, shard_samples, world_size)):
        total = sum(shard_samples[i] for i in shards)
        if total < B:
            raise DataError(
                f"epoch {epoch}: rank {rank} gets only {total} samples from its {len(shards)} shard(s) but "
                f"every rank must yield {B} batches: the shards are too few or too uneven for "
                f"world_size={world_size}; write smaller shards (jobs/prepare_data.py --shard-samples)"
            )
        used = max(1, min(streams_per_rank, B, len(shards)))
        groups = _greedy(shards, shard_samples, used) + [[] for _ in range(streams_per_rank - used)]
        groups = [sorted(g, key=position.__getitem__) for g in groups]
        counts = [sum(shard_samples[i] for i in g) for g in groups]
        slots = _dhondt(counts, B)
        indices: list[list[int]] = [[] for _ in groups]
        j = 0
        for k in range(max(slots)):
            for s in range(len(groups)):
                if k < slots[s]:
                    indices[s].append(j)
                    j += 1
        for s, g in enumerate(groups):
            c, b = counts[s], slots[s]
            sizes = tuple((k + 1) * c // b - k * c // b for k in range(b))
            streams.append(StreamPlan(rank, s, tuple(g), c, tuple(indices[s]), sizes))
    return EpochPlan(epoch, B, world_size, streams_per_rank, tuple(streams))


# ------------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """One batch of one rank. ``images`` float32 (n, C, H, W) in [-1, 1]; ``labels`` int64 (n,)."""

    images: torch.Tensor
    labels: torch.Tensor
    keys: tuple[str, ...]  # sample keys (a refilled image repeats a key)
    epoch: int
    index: int  # batch index within the epoch, 0 .. batches_per_epoch - 1
    skipped: int = 0  # samples lost to bad data while this batch was assembled (see module doc)
    refilled: int = 0  # images in this batch that are re-drawn copies standing in for lost ones
    errors: tuple[str, ...] = field(default_factory=tuple)  # what was skipped, and why

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _identity(x: Any) -> Any:
    return x


class _Raw(NamedTuple):
    key: str
    image: bytes
    ext: str
    cls: bytes
    url: str


@dataclass(frozen=True)
class _Spec:
    """Everything a worker needs (picklable, no clients)."""

    storage: dict[str, Any]
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    sha256: tuple[str, ...]
    nbytes: tuple[int, ...]
    image_size: int
    channels: int
    num_classes: int
    shuffle_buffer: int
    hflip: bool
    strict: bool
    seed: int

    @classmethod
    def from_manifest(
        cls, m: Manifest, storage: Any, *, shuffle_buffer: int, hflip: bool, strict: bool, seed: int
    ) -> _Spec:
        return cls(
            storage=storage_kwargs(storage),
            urls=tuple(m.shard_urls),
            counts=tuple(s.samples for s in m.shards),
            sha256=tuple(s.sha256 for s in m.shards),
            nbytes=tuple(s.bytes for s in m.shards),
            image_size=m.image_size,
            channels=m.channels,
            num_classes=len(m.class_names),
            shuffle_buffer=shuffle_buffer,
            hflip=hflip,
            strict=strict,
            seed=seed,
        )


class _HashingReader:
    """Read-through wrapper counting bytes and hashing them (verifies shards against the manifest)."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.n = 0

    def read(self, size: int = -1) -> bytes:
        b = self.f.read(size)
        self.sha.update(b)
        self.n += len(b)
        return b

    def drain(self) -> None:
        while self.read(1 << 16):
            pass


def _stream_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError
    from urllib3.exceptions import HTTPError

    return (tarfile.TarError, OSError, EOFError, ValueError, BotoCoreError, HTTPError, DataError)


class _Stream:
    """One (rank, stream) of one epoch: raw samples -> shuffle buffer -> decoded batches."""

    def __init__(self, spec: _Spec, plan: StreamPlan, epoch: int) -> None:
        self.spec = spec
        self.plan = plan
        self.epoch = epoch
        self.skipped = 0
        self._nothing_to_borrow = False  # other shards were read once and gave nothing: don't reread them
        self.messages: list[str] = []
        self.mode = MODES[spec.channels]

    # -- events ---------------------------------------------------------------------------------

    def _bad(self, count: int, message: str, url: str) -> None:
        if self.spec.strict:
            raise ShardError(f"bad data (strict mode): {message}", url=url)
        log.warning("skipping bad data: %s", message)
        self.skipped += count
        self.messages.append(message)

    def _take_events(self) -> tuple[int, tuple[str, ...]]:
        n, msgs = self.skipped, self.messages
        self.skipped, self.messages = 0, []
        if len(msgs) > MAX_MESSAGES:
            msgs = [*msgs[:MAX_MESSAGES], f"... and {len(msgs) - MAX_MESSAGES} more"]
        return n, tuple(msgs)

    # -- raw samples ----------------------------------------------------------------------------

    def _shard_samples(self, i: int, *, own: bool = True) -> Iterator[_Raw]:
        """The complete samples of shard i, in tar order; problems reported via _bad (if own)."""
        spec = self.spec
        url, expected = spec.urls[i], spec.counts[i]
        seen = extra = 0
        error: str | None = None
        digest_ok = True
        f = None
        try:
            f = open_read(url, spec.storage)
            hf = _HashingReader(f)
            with tarfile.open(fileobj=hf, mode="r|*") as tf:
                for key, members, bad in _tar_samples(tf):
                    seen += 1
                    if seen > expected:
                        extra += 1
                        continue
                    img_ext = next((e for e in IMAGE_FORMATS if e in members), None)
                    if bad is None and (img_ext is None or "cls" not in members):
                        bad = f"missing member(s): has {sorted(members)}, needs an image (png/jpg) and cls"
                    if bad is not None:
                        if own:
                            self._bad(1, f"{url}: sample {key}: {bad}", url)
                        continue
                    yield _Raw(key, members[img_ext], img_ext, members["cls"], url)
            hf.drain()
            if spec.sha256[i]:
                digest_ok = hf.n == spec.nbytes[i] and hf.sha.hexdigest() == spec.sha256[i]
        except (*FATAL, ShardError):
            raise
        except _stream_errors() as e:
            error = f"{type(e).__name__}: {e}"
        finally:
            if f is not None:
                with contextlib.suppress(Exception):  # closing a broken stream must not mask the error
                    f.close()
        lost = max(expected - seen, 0)
        problems = [error] if error else []
        if lost and not error:
            problems.append(f"ended after {seen} samples, the manifest says {expected}")
        if extra:
            problems.append(f"holds {seen} samples, the manifest says {expected}; the extra ones were ignored")
        if not error and not digest_ok:
            problems.append(
                f"content differs from the manifest ({hf.n} bytes read, {spec.nbytes[i]} expected; sha256 mismatch)"
            )
        if problems:
            message = f"{url}: {'; '.join(problems)}" + (f"; {lost} of {expected} samples lost" if lost else "")
            if own:
                self._bad(lost, message, url)
            else:
                log.warning("while borrowing samples: %s", message)

    def _raw(self) -> Iterator[_Raw]:
        for i in self.plan.shards:
            yield from self._shard_samples(i)

    def _borrow(self) -> list[_Raw]:
        """Samples from other shards, for a stream that could read none of its own."""
        out: list[_Raw] = []
        if self._nothing_to_borrow:
            return out
        own = set(self.plan.shards)
        for i in range(len(self.spec.urls)):
            if i in own:
                continue
            for raw in self._shard_samples(i, own=False):
                out.append(raw)
                if len(out) >= 64:
                    return out
        self._nothing_to_borrow = not out
        return out

    # -- decoding -------------------------------------------------------------------------------

    def _decode(self, raw: _Raw) -> tuple[np.ndarray, int] | str:
        s = self.spec.image_size
        try:
            with Image.open(io.BytesIO(raw.image), formats=[IMAGE_FORMATS[raw.ext]]) as im:
                if im.size != (s, s):
                    return f"{raw.url}: sample {raw.key}: image is {im.size[0]}x{im.size[1]}, the manifest says {s}x{s}"
                arr = np.asarray(im if im.mode == self.mode else im.convert(self.mode))
            label = int(raw.cls.decode("ascii").strip())
            if not 0 <= label < self.spec.num_classes:
                return f"{raw.url}: sample {raw.key}: class {label} outside 0..{self.spec.num_classes - 1}"
        except UnidentifiedImageError:
            return f"{raw.url}: sample {raw.key}: {raw.key}.{raw.ext} is not a decodable {IMAGE_FORMATS[raw.ext]} image"
        except Exception as e:  # noqa: BLE001 - untrusted bytes: any failure means undecodable
            return f"{raw.url}: sample {raw.key}: cannot decode: {type(e).__name__}: {e}"
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return arr, label

    def _make_batch(self, j: int, chosen: list[_Raw], size: int, pool: deque[_Raw]) -> Batch:
        rng = random.Random(derive_seed("refill", self.spec.seed, self.epoch, self.plan.rank, self.plan.stream, j))
        arrays: list[np.ndarray] = []
        labels: list[int] = []
        keys: list[str] = []
        refilled = 0

        def decode_pool_item() -> bool:
            for _ in range(REPLACE_TRIES):
                if not pool:
                    pool.extend(self._borrow())
                    if not pool:
                        return False
                raw = pool[rng.randrange(len(pool))]
                out = self._decode(raw)
                if not isinstance(out, str):
                    arrays.append(out[0])
                    labels.append(out[1])
                    keys.append(raw.key)
                    return True
            return False

        for raw in chosen:
            out = self._decode(raw)
            if isinstance(out, str):
                self._bad(1, out, raw.url)
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
                f"{[self.spec.urls[i] for i in self.plan.shards]} or the samples it could borrow"
            )
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()
        if self.spec.hflip:
            flip_rng = np.random.default_rng(derive_seed("flip", self.spec.seed, self.epoch, self.plan.rank, j))
            mask = torch.from_numpy(flip_rng.random(len(arrays)) < 0.5)
            x[mask] = x[mask].flip(-1)
        skipped, messages = self._take_events()
        return Batch(
            images=x,
            labels=torch.tensor(labels, dtype=torch.int64),
            keys=tuple(keys),
            epoch=self.epoch,
            index=j,
            skipped=skipped,
            refilled=refilled,
            errors=messages,
        )

    # -- the stream -----------------------------------------------------------------------------

    def batches(self, start_batch: int) -> Iterator[Batch]:
        spec, plan = self.spec, self.plan
        rng = random.Random(derive_seed("shuffle", spec.seed, self.epoch, plan.rank, plan.stream))
        capacity = max(1, spec.shuffle_buffer)
        shuffle = spec.shuffle_buffer > 1
        raw = self._raw()
        buf: list[_Raw] = []
        exhausted = False
        pool: deque[_Raw] = deque(maxlen=max(REFILL_POOL, *plan.batch_sizes))
        for j, size in zip(plan.batch_indices, plan.batch_sizes, strict=True):
            chosen: list[_Raw] = []
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
                self._take_events()  # events of batches before the resume point belong to them
                continue
            yield self._make_batch(j, chosen, size, pool)


class _EpochDataset(IterableDataset):
    def __init__(self, spec: _Spec, plan: EpochPlan, rank: int, start_batch: int) -> None:
        self.spec = spec
        self.plan = plan
        self.rank = rank
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[Batch]:
        streams = [sp for sp in self.plan.rank_streams(self.rank) if sp.batch_indices]
        info = get_worker_info()
        if info is not None:
            streams = [sp for sp in streams if sp.stream % info.num_workers == info.id]
        gens = [_Stream(self.spec, sp, self.plan.epoch).batches(self.start_batch) for sp in streams]
        if len(gens) == 1:
            yield from gens[0]
        else:
            yield from heapq.merge(*gens, key=lambda b: b.index)


def _tar_samples(tf: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """(key, {ext: bytes} of the wanted members, problem or None) for consecutive members of a key."""
    key: str | None = None
    members: dict[str, bytes] = {}
    bad: str | None = None
    for ti in tf:
        tf.members = []  # stream mode: don't keep every TarInfo
        if not ti.isreg():
            continue
        m = _KEY_RE.match(ti.name)
        if m is None or (ti.name.startswith("__") and ti.name.endswith("__")):
            continue
        k, ext = m.group(1), m.group(2).lower()
        if k != key:
            if key is not None:
                yield key, members, bad
            key, members, bad = k, {}, None
        if ext not in WANTED:
            continue
        if ext in members:
            bad = f"duplicate member {ti.name}"
        elif ti.size > MAX_MEMBER_BYTES:
            bad = f"member {ti.name} is {ti.size} bytes (limit {MAX_MEMBER_BYTES})"
        else:
            fo = tf.extractfile(ti)
            members[ext] = fo.read() if fo is not None else b""
    if key is not None:
        yield key, members, bad


# ------------------------------------------------------------------------------------------------
# The reader


class ShardReader:
    """Streams one split's shards to one DDP rank. See the module docstring for the exact rule.

    Args:
        data: DataConfig (url, image_size and channels checked against the manifest,
            shuffle_buffer, hflip, loader_workers, strict); ``loader_workers="auto"`` means 2 when CUDA
            is available, else 0 (the trainer resolves it for its own device first).
        storage: StorageConfig (or a dict of boto3 client keywords) for s3:// URLs.
        split: "train" or "eval" (a sub-directory of ``data.url``).
        rank, world_size: this process's DDP rank and the number of ranks.
        batch_size: the nominal per-rank batch; actual sizes differ by a sample or so.
        seed: seeds the shard order, shuffle buffers, flips and refills (with the epoch).
        manifest: an already-read manifest (skips reading it).
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
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in 0..world_size-1 (world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.data = data
        self.split = split
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.seed = seed
        self.manifest = manifest or open_manifest(data.url, storage, split)
        check_matches(self.manifest, image_size=data.image_size, channels=data.channels)
        m = self.manifest
        if m.num_samples == 0 or not m.shards:
            raise ManifestError(f"dataset {m.url} has no samples", url=m.url)
        counts = [s.samples for s in m.shards]
        self.loader_workers = data.workers_for("cuda" if torch.cuda.is_available() else "cpu")
        self.streams_per_rank = max(1, self.loader_workers)
        self.batches_per_epoch = max(1, math.ceil(m.num_samples / (world_size * batch_size)))
        if len(counts) < world_size or m.num_samples - (world_size - 1) * max(counts) < world_size * (
            self.batches_per_epoch
        ):
            raise DataError(
                f"dataset {m.url} has {len(counts)} shard(s) of up to {max(counts)} samples "
                f"({m.num_samples} in all): too few or too large to give each of world_size={world_size} "
                f"ranks {self.batches_per_epoch} batches of ~{batch_size}; write smaller shards "
                f"(jobs/prepare_data.py --shard-samples)",
                url=m.url,
            )
        self._spec = _Spec.from_manifest(
            m, storage, shuffle_buffer=data.shuffle_buffer, hflip=data.hflip, strict=data.strict, seed=seed
        )
        self._position = (0, 0)

    # -- layout ---------------------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    def plan(self, epoch: int) -> EpochPlan:
        """The shard/batch assignment of an epoch (identical on every rank)."""
        return plan_epoch(
            self._spec.counts,
            world_size=self.world_size,
            streams_per_rank=self.streams_per_rank,
            batches_per_epoch=self.batches_per_epoch,
            seed=self.seed,
            epoch=epoch,
        )

    def layout(self) -> dict[str, Any]:
        """The inputs of the rule; a position can only be resumed exactly under the same layout."""
        shards = "".join(s.sha256 or s.name for s in self.manifest.shards)
        return {
            "manifest": hashlib.sha256(shards.encode()).hexdigest()[:16],
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "streams_per_rank": self.streams_per_rank,
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
        dataset = _EpochDataset(self._spec, self.plan(epoch), self.rank, start_batch)
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
        pending: dict[int, Batch] = {}
        expect = start_batch
        try:
            for batch in source:
                pending[batch.index] = batch
                while expect in pending:
                    out = pending.pop(expect)
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


def _close(source: Iterator[Batch]) -> None:
    shutdown = getattr(source, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    elif hasattr(source, "close"):
        source.close()


# ------------------------------------------------------------------------------------------------
# Whole small splits (evaluation)


class SplitArrays(NamedTuple):
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    keys: list[str]
    class_names: list[str]


def load_split_arrays(
    url: str, storage: Any = None, split: str = "eval", *, strict: bool = True, limit: int | None = None
) -> SplitArrays:
    """Read a whole (small) split into memory, in manifest shard order then tar order.

    ``url`` is the dataset root (as ``data.url``). With strict=True (default) any bad shard or sample
    raises ShardError; otherwise it is skipped and logged. ``limit`` stops after that many images.
    """
    m = open_manifest(url, storage, split)
    spec = _Spec.from_manifest(m, storage, shuffle_buffer=0, hflip=False, strict=strict, seed=0)
    plan = StreamPlan(0, 0, tuple(range(len(m.shards))), m.num_samples, (), ())
    stream = _Stream(spec, plan, epoch=0)
    images: list[np.ndarray] = []
    labels: list[int] = []
    keys: list[str] = []
    for raw in stream._raw():
        out = stream._decode(raw)
        if isinstance(out, str):
            stream._bad(1, out, raw.url)
            continue
        images.append(out[0])
        labels.append(out[1])
        keys.append(raw.key)
        if limit is not None and len(images) >= limit:
            break
    s, c = m.image_size, m.channels
    return SplitArrays(
        images=np.stack(images) if images else np.zeros((0, s, s, c), np.uint8),
        labels=np.asarray(labels, dtype=np.int64),
        keys=keys,
        class_names=list(m.class_names),
    )
