"""Reading the samples of WebDataset shards: tar decoding, validation, and the account of bad data.

``Shards(spec)`` reads the raw samples of a split's shards in tar order, checking each shard's byte
count and sha256 against the manifest as it streams, and ``decode`` turns a raw sample into a uint8
(H, W, C) array and a class index. Only the image (png/jpg) and ``cls`` members are ever read: PIL
with the format pinned and ``int()``, nothing is unpickled or ``torch.load``ed from a shard.

Bad data (missing shard, truncated or garbage tar, undecodable image or label, wrong size, counts or
digest differing from the manifest) is skipped, counted and described (``take_events``) and logged;
``strict`` raises a ShardError naming the shard URL instead. Wrong keys, a missing bucket or an
unreachable endpoint are never skipped: they raise at once.

``load_split_arrays`` reads a whole small split into memory this way (the evaluation's real images).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.errors import (
    DataError,
    MissingBucketError,
    ShardError,
    StorageAuthError,
    StorageUnreachableError,
)
from pipeline.data.manifest import Manifest, open_manifest
from pipeline.data.storage import open_read, outage_limit, storage_kwargs

log = logging.getLogger("pipeline.data")

IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}
WANTED = {*IMAGE_FORMATS, "cls"}
MAX_MEMBER_BYTES = 64 << 20  # larger members are treated as corrupt (never read into memory)
MODES = {1: "L", 3: "RGB", 4: "RGBA"}
MAX_MESSAGES = 20  # messages kept per batch
BORROW = 64  # samples borrowed at a time from other shards
FATAL = (StorageAuthError, MissingBucketError, StorageUnreachableError)
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


@dataclass(frozen=True)
class ShardSpec:
    """What reading a split's shards needs, picklable (no clients): DataLoader workers get a copy."""

    storage: dict[str, Any]
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    sha256: tuple[str, ...]
    nbytes: tuple[int, ...]
    image_size: int
    channels: int
    num_classes: int
    strict: bool

    @classmethod
    def from_manifest(cls, m: Manifest, storage: Any, *, strict: bool) -> ShardSpec:
        return cls(
            storage=storage_kwargs(storage) | {"outage_s": outage_limit(storage)},
            urls=tuple(m.shard_urls),
            counts=tuple(s.samples for s in m.shards),
            sha256=tuple(s.sha256 for s in m.shards),
            nbytes=tuple(s.bytes for s in m.shards),
            image_size=m.image_size,
            channels=m.channels,
            num_classes=len(m.class_names),
            strict=strict,
        )


class RawSample(NamedTuple):
    """One complete sample as read from a tar, not yet decoded."""

    key: str
    image: bytes
    ext: str
    cls: bytes
    url: str  # the shard's


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
    """What a broken shard raises while it streams (data errors, unlike FATAL)."""
    from botocore.exceptions import BotoCoreError
    from urllib3.exceptions import HTTPError

    return (tarfile.TarError, OSError, EOFError, ValueError, BotoCoreError, HTTPError, DataError)


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


class Shards:
    """The shards of one split as one reader sees them: raw samples, decoding, and the bad data found.

    Problems found while reading (``samples``) or reported with ``bad`` accumulate until
    ``take_events`` hands them to the batch being assembled; in strict mode they raise ShardError.
    """

    def __init__(self, spec: ShardSpec) -> None:
        self.spec = spec
        self.mode = MODES[spec.channels]
        self.skipped = 0
        self.messages: list[str] = []
        self._nothing_to_borrow = False  # other shards were read once and gave nothing: don't reread them

    # -- bad data -------------------------------------------------------------------------------

    def bad(self, count: int, message: str, url: str) -> None:
        """``count`` samples of ``url`` are lost (skipped and counted; raises in strict mode)."""
        if self.spec.strict:
            raise ShardError(f"bad data (strict mode): {message}", url=url)
        log.warning("skipping bad data: %s", message)
        self.skipped += count
        self.messages.append(message)

    def take_events(self) -> tuple[int, tuple[str, ...]]:
        """(samples lost, their descriptions) since the last call."""
        n, msgs = self.skipped, self.messages
        self.skipped, self.messages = 0, []
        if len(msgs) > MAX_MESSAGES:
            msgs = [*msgs[:MAX_MESSAGES], f"... and {len(msgs) - MAX_MESSAGES} more"]
        return n, tuple(msgs)

    # -- raw samples ----------------------------------------------------------------------------

    def samples(self, shards: Iterable[int]) -> Iterator[RawSample]:
        """The complete samples of these shards (manifest indices), in that order and tar order."""
        for i in shards:
            yield from self._shard(i)

    def _shard(self, i: int, *, own: bool = True) -> Iterator[RawSample]:
        """The complete samples of shard i, in tar order; problems reported via bad() (if own)."""
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
                            self.bad(1, f"{url}: sample {key}: {bad}", url)
                        continue
                    yield RawSample(key, members[img_ext], img_ext, members["cls"], url)
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
                self.bad(lost, message, url)
            else:
                log.warning("while borrowing samples: %s", message)

    def borrow(self, own: Iterable[int]) -> list[RawSample]:
        """Up to BORROW samples of shards other than ``own``, for a stream that could read none of its own.
        Their problems are logged, not counted (they belong to the streams that own those shards)."""
        out: list[RawSample] = []
        if self._nothing_to_borrow:
            return out
        own = set(own)
        for i in range(len(self.spec.urls)):
            if i in own:
                continue
            for raw in self._shard(i, own=False):
                out.append(raw)
                if len(out) >= BORROW:
                    return out
        self._nothing_to_borrow = not out
        return out

    # -- decoding -------------------------------------------------------------------------------

    def decode(self, raw: RawSample) -> tuple[np.ndarray, int] | str:
        """(uint8 (H, W, C) image, class index), or what is wrong with the sample (not yet counted)."""
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
    shards = Shards(ShardSpec.from_manifest(m, storage, strict=strict))
    images: list[np.ndarray] = []
    labels: list[int] = []
    keys: list[str] = []
    for raw in shards.samples(range(len(m.shards))):
        out = shards.decode(raw)
        if isinstance(out, str):
            shards.bad(1, out, raw.url)
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
