"""Reading the samples of WebDataset shards: tar decoding, validation, and the account of bad data.

``Shards(spec)`` reads the raw samples of a split's shards in tar order, checking each shard's byte
count and sha256 against the manifest as it streams, and ``decode`` turns a raw sample into a uint8
(H, W, C) array and a class index. Only the image (png/jpg/webp) and label members are ever read (the
label: ``.cls``, or a field of ``.json`` with ``data.label_key``, or none): PIL with the format pinned,
``int()`` and ``json.loads``; nothing is unpickled or ``torch.load``ed from a shard.

An image stored at another size than the one asked for is resized (shorter side, Lanczos; JPEGs are
first decoded at a reduced scale where that suffices) and cropped, centred or at a random place
(``data.resize``); with ``never`` it is bad data. Same-size images are not touched.

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
import json
import logging
import random
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

IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
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
    image_size: int  # what decode returns
    channels: int
    num_classes: int
    strict: bool
    resize: str = "never"  # "center" | "random" | "never" (a stored size other than image_size is bad data)
    labels: str = "cls"  # "cls", "json:<field>" or "none" (every label 0)
    indexed: bool = False  # shards indexed in place: keys without an image are not samples (the index left them out)

    @classmethod
    def from_manifest(
        cls,
        m: Manifest,
        storage: Any,
        *,
        strict: bool,
        image_size: int | None = None,
        channels: int | None = None,
        resize: str = "never",
        label_key: str | None = None,
    ) -> ShardSpec:
        """The manifest's shards, decoded to ``image_size`` x ``channels`` (default: the manifest's), with
        labels from ``label_key`` (cls or a .json field; default: the manifest's ``labels``)."""
        size, chans = image_size or m.image_size, channels or m.channels
        if size is None or chans is None:
            raise DataError(f"{m.url}: indexed shards of unknown sizes: give the image size and channels to read them")
        return cls(
            storage=storage_kwargs(storage) | {"outage_s": outage_limit(storage)},
            urls=tuple(m.shard_urls),
            counts=tuple(s.samples for s in m.shards),
            sha256=tuple(s.sha256 for s in m.shards),
            nbytes=tuple(s.bytes for s in m.shards),
            image_size=size,
            channels=chans,
            num_classes=len(m.class_names),
            strict=strict,
            resize=resize,
            labels=m.labels if label_key is None else ("cls" if label_key == "cls" else f"json:{label_key}"),
            indexed=m.indexed,
        )

    @property
    def label_member(self) -> str | None:
        return None if self.labels == "none" else ("cls" if self.labels == "cls" else "json")


class RawSample(NamedTuple):
    """One complete sample as read from a tar, not yet decoded."""

    key: str
    image: bytes
    ext: str
    label: bytes  # the label member's bytes (.cls text or .json), b"" when the dataset has no labels
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


def _tar_samples(tf: tarfile.TarFile, wanted: set[str]) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
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
        if ext not in wanted:
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
        label = spec.label_member
        wanted = {*IMAGE_FORMATS, *([label] if label else [])}
        try:
            f = open_read(url, spec.storage)
            hf = _HashingReader(f)
            with tarfile.open(fileobj=hf, mode="r|*") as tf:
                for key, members, bad in _tar_samples(tf, wanted):
                    img_ext = next((e for e in IMAGE_FORMATS if e in members), None)
                    if img_ext is None and spec.indexed and bad is None:
                        continue  # not a sample: the index counted only keys with an image
                    seen += 1
                    if seen > expected:
                        extra += 1
                        continue
                    if bad is None and (img_ext is None or (label and label not in members)):
                        needs = "an image (" + "/".join(IMAGE_FORMATS) + ")" + (f" and {label}" if label else "")
                        bad = f"missing member(s): has {sorted(members)}, needs {needs}"
                    if bad is not None:
                        if own:
                            self.bad(1, f"{url}: sample {key}: {bad}", url)
                        continue
                    yield RawSample(key, members[img_ext], img_ext, members.get(label, b"") if label else b"", url)
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

    def decode(self, raw: RawSample, rng: random.Random | None = None) -> tuple[np.ndarray, int] | str:
        """(uint8 (H, W, C) image, class index), or what is wrong with the sample (not yet counted).
        ``rng`` places a random crop (``data.resize random``)."""
        spec, s = self.spec, self.spec.image_size
        try:
            with Image.open(io.BytesIO(raw.image), formats=[IMAGE_FORMATS[raw.ext]]) as im:
                if im.size != (s, s):
                    if spec.resize == "never":
                        return (
                            f"{raw.url}: sample {raw.key}: image is {im.size[0]}x{im.size[1]}, {s}x{s} is asked for "
                            "and data.resize is never"
                        )
                    im = fit(im, s, rng if spec.resize == "random" else None)
                arr = np.asarray(im if im.mode == self.mode else im.convert(self.mode))
            label = self.label(raw)
        except UnidentifiedImageError:
            return f"{raw.url}: sample {raw.key}: {raw.key}.{raw.ext} is not a decodable {IMAGE_FORMATS[raw.ext]} image"
        except Exception as e:  # noqa: BLE001 - untrusted bytes: any failure means undecodable
            return f"{raw.url}: sample {raw.key}: cannot decode: {type(e).__name__}: {e}"
        if isinstance(label, str):
            return label
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return arr, label

    def label(self, raw: RawSample) -> int | str:
        """The sample's class index, or what is wrong with its label."""
        spec = self.spec
        if spec.labels == "none":
            return 0
        try:
            if spec.labels == "cls":
                label = int(raw.label.decode("ascii").strip())
            else:
                value = json.loads(raw.label)[spec.labels.removeprefix("json:")]
                label = int(value) if isinstance(value, int | str) and not isinstance(value, bool) else None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            label = None
        if label is None:
            return (
                f"{raw.url}: sample {raw.key}: no integer class in its {spec.labels.replace('json:', '.json field ')}"
            )
        if not 0 <= label < spec.num_classes:
            return f"{raw.url}: sample {raw.key}: class {label} outside 0..{spec.num_classes - 1}"
        return label


def fit(im: Image.Image, size: int, rng: random.Random | None = None) -> Image.Image:
    """The shorter side resized to ``size`` (Lanczos), then a ``size`` x ``size`` crop: centred, or at a
    place drawn from ``rng``. A JPEG much larger than the target is decoded at 1/2, 1/4 or 1/8 scale
    first (``draft``: the DCT scaling costs a fraction of a full decode)."""
    if im.format == "JPEG":
        w, h = im.size
        scale = min(w, h) / size
        if scale >= 2:
            im.draft(im.mode, (max(size, -(-w // int(scale))), max(size, -(-h // int(scale)))))
    w, h = im.size
    k = size / min(w, h)
    nw, nh = max(size, round(w * k)), max(size, round(h * k))
    im = im.resize((nw, nh), Image.Resampling.LANCZOS)
    x = rng.randrange(nw - size + 1) if rng else (nw - size) // 2
    y = rng.randrange(nh - size + 1) if rng else (nh - size) // 2
    return im.crop((x, y, x + size, y + size))


# ------------------------------------------------------------------------------------------------
# Whole small splits (evaluation)


class SplitArrays(NamedTuple):
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    keys: list[str]
    class_names: list[str]


def load_split_arrays(
    url: str,
    storage: Any = None,
    split: str = "eval",
    *,
    strict: bool = True,
    limit: int | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    resize: str = "center",
    label_key: str | None = None,
) -> SplitArrays:
    """Read a whole (small) split into memory, in manifest shard order then tar order.

    ``url`` is the dataset root (as ``data.url``). With strict=True (default) any bad shard or sample
    raises ShardError; otherwise it is skipped and logged. ``limit`` stops after that many images.
    ``image_size``/``channels`` (default: the manifest's) are what the images are resized (centre crop)
    and converted to, ``label_key`` where their classes are (as ``DataConfig``'s).
    """
    m = open_manifest(url, storage, split)
    spec = ShardSpec.from_manifest(
        m, storage, strict=strict, image_size=image_size, channels=channels, resize=resize, label_key=label_key
    )
    shards = Shards(spec)
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
    s, c = spec.image_size, spec.channels
    return SplitArrays(
        images=np.stack(images) if images else np.zeros((0, s, s, c), np.uint8),
        labels=np.asarray(labels, dtype=np.int64),
        keys=keys,
        class_names=list(m.class_names),
    )
