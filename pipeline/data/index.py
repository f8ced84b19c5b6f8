"""Manifests for WebDataset shards that already exist (img2dataset's ``{00000..01023}.tar`` or your own):
``prepare_data --source webdataset --shards PATTERN --index-only``.

Nothing is copied or decoded. Each shard is walked header by header with ranged reads: a tar member's
512-byte header gives its name and size, and the next header lies at the next 512-byte boundary past
its data, so an image member's bytes are skipped, never read. Only the small members that carry a
label (``.cls``, or the ``.json`` of ``--label-key``) are read, together with the header after them in
one request. A shard costs about one request per member; shards are walked by a pool of threads, since
the work is waiting on storage. ``--checksums`` also streams every shard once for its sha256.

The manifests (``<out>/train/manifest.json``, ``<out>/eval/manifest.json``) name the shards by their
absolute URLs, so ``--out`` can be another bucket than a read-only one holding the shards. The eval
split is a seeded choice of whole shards (``--eval-fraction`` of them, at least one shard left for
training). Sizes and modes are left to the reader (``image_size``/``channels`` None): it resizes and
converts on read (``--data.resize``).
"""

from __future__ import annotations

import hashlib
import json
import random
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.data.errors import DataError
from pipeline.data.manifest import FORMAT, FORMAT_VERSION, INDEX_KIND, MANIFEST_NAME, Manifest, ShardEntry
from pipeline.data.shards import IMAGE_FORMATS
from pipeline.data.storage import join_url, list_sizes, object_size, open_read, read_range, write_bytes

BLOCK = 512
LABEL_MEMBER_MAX = 64 << 10  # a label member larger than this is not read (the sample is unlabelled)
SMALL = 4 << 10  # a non-image member up to this size is read with the header after it (one request)
WORKERS = 16  # shards walked at once
_SPECIAL = (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, tarfile.XGLTYPE)


@dataclass
class ShardIndex:
    """What the walk of one shard found."""

    url: str
    bytes: int
    samples: int = 0  # keys with an image member
    without_image: int = 0  # keys without one (the reader would skip them)
    image_members: Counter = field(default_factory=Counter)  # extension -> count
    labels: Counter = field(default_factory=Counter)  # class index -> count (labelled samples only)
    unlabelled: int = 0  # samples whose label member is missing or not an integer
    requests: int = 0
    bytes_read: int = 0
    sha256: str = ""


def expand_shards(spec: str, storage: Any) -> dict[str, int]:
    """URL -> size of every shard of a brace pattern or a prefix (its .tar objects), in order."""
    if "{" in spec:
        from braceexpand import braceexpand

        urls = list(braceexpand(spec))
        with ThreadPoolExecutor(WORKERS) as pool:
            sizes = dict(zip(urls, pool.map(lambda u: object_size(u, storage), urls), strict=True))
    else:
        sizes = {u: n for u, n in sorted(list_sizes(spec, storage).items()) if u.endswith(".tar")}
    if not sizes:
        raise DataError(f"--shards {spec}: no .tar object under this prefix", url=spec)
    return sizes


class _Walk:
    """Ranged reads through one tar, keeping what one read brought beyond what was asked."""

    def __init__(self, url: str, storage: Any, stats: ShardIndex) -> None:
        self.url, self.storage, self.stats = url, storage, stats
        self.start, self.buf = 0, b""  # buf holds the shard's bytes start .. start + len(buf)

    def read(self, pos: int, n: int, ahead: int = 0) -> bytes:
        """Bytes pos .. pos + n; a read that must go to storage also brings ``ahead`` bytes more."""
        if not (self.start <= pos and pos + n <= self.start + len(self.buf)):
            self.buf, self.start = read_range(self.url, pos, n + ahead, self.storage), pos
            self.stats.requests += 1
            self.stats.bytes_read += len(self.buf)
        return self.buf[pos - self.start : pos - self.start + n]

    def members(self, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes | None]]:
        """(name, data if ``wanted(name)`` and small, else None) of every regular member, in tar order."""
        pos, long_name, size = 0, None, self.stats.bytes
        while True:
            header = self.read(pos, BLOCK)
            if len(header) < BLOCK and pos != size:  # members are padded to whole blocks: a whole tar ends at one
                raise DataError(f"{self.url}: truncated: {size} bytes, a tar block was due at byte {pos}", url=self.url)
            if len(header) < BLOCK or header == bytes(BLOCK):
                return
            try:
                info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            except tarfile.HeaderError as e:
                raise DataError(f"{self.url}: not a tar archive at byte {pos}: {e}", url=self.url) from None
            data_at, end = pos + BLOCK, pos + BLOCK + -(-info.size // BLOCK) * BLOCK
            if end > size:
                raise DataError(
                    f"{self.url}: truncated: member {info.name} runs to byte {end}, the object has {size}", url=self.url
                )
            if info.type in _SPECIAL:  # a long name (GNU) or pax header: applies to the next member
                data = self.read(data_at, info.size, ahead=end - data_at - info.size + BLOCK)
                if info.type == tarfile.GNUTYPE_LONGNAME:
                    long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
                elif info.type == tarfile.XHDTYPE:
                    long_name = _pax_path(data) or long_name
                pos = end
                continue
            name, long_name = long_name or info.name, None
            data = None
            if info.isreg() and wanted(name) and info.size <= LABEL_MEMBER_MAX:
                data = self.read(data_at, info.size, ahead=end - data_at - info.size + BLOCK)
            elif info.isreg() and info.size <= SMALL and not is_image(name):
                self.read(data_at, info.size, ahead=end - data_at - info.size + BLOCK)  # the next header with it
            if info.isreg():
                yield name, data
            pos = end


def is_image(name: str) -> bool:
    split = key_ext(name)
    return split is not None and split[1] in IMAGE_FORMATS


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header ("<len> path=<value>\\n" records)."""
    for rec in data.decode("utf-8", "surrogateescape").split("\n"):
        _, _, kv = rec.partition(" ")
        if kv.startswith("path="):
            return kv[5:]
    return None


def key_ext(name: str) -> tuple[str, str] | None:
    """WebDataset's split of a member name: the key up to the first dot of the last path part."""
    head, _, last = name.rpartition("/")
    base, dot, ext = last.partition(".")
    if not dot or (last.startswith("__") and last.endswith("__")):
        return None
    return (f"{head}/{base}" if head else base), ext.lower()


def label_of(data: bytes | None, label_key: str | None) -> int | None:
    if data is None:
        return None
    try:
        value = json.loads(data)[label_key] if label_key else int(data.decode("ascii").strip())
        return int(value) if isinstance(value, int | str) and not isinstance(value, bool) else None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def index_shard(url: str, size: int, storage: Any, *, label_key: str | None, checksum: bool) -> ShardIndex:
    """Walk one shard's headers (see the module docstring)."""
    stats = ShardIndex(url, size)
    label_ext = "json" if label_key else "cls"
    key, has_image, label = None, False, None

    def close_sample() -> None:
        if key is None:
            return
        if not has_image:
            stats.without_image += 1
            return
        stats.samples += 1
        if label is None:
            stats.unlabelled += 1
        else:
            stats.labels[label] += 1

    for name, data in _Walk(url, storage, stats).members(lambda n: n.lower().endswith("." + label_ext)):
        split = key_ext(name)
        if split is None:
            continue
        k, ext = split
        if k != key:
            close_sample()
            key, has_image, label = k, False, None
        if ext in IMAGE_FORMATS:
            has_image = True
            stats.image_members[ext] += 1
        elif ext == label_ext:
            label = label_of(data, label_key)
    close_sample()
    if checksum:
        sha = hashlib.sha256()
        with open_read(url, storage) as f:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
                stats.bytes_read += len(chunk)
        stats.sha256 = sha.hexdigest()
    return stats


def index_dataset(
    spec: str,
    out: str,
    storage: Any,
    *,
    label_key: str | None = None,
    checksums: bool = False,
    eval_fraction: float = 0.0,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Manifest]:
    """Index the shards of ``spec`` and write the manifests under ``out`` (train, and eval when
    ``eval_fraction`` leaves it a shard). Returns them by split."""
    t0 = time.perf_counter()
    label_key = None if label_key == "cls" else label_key
    sizes = expand_shards(spec, storage)
    log(f"indexing {len(sizes)} shard(s) of {spec} ({sum(sizes.values()) / 1e6:.1f} MB stored)")
    with ThreadPoolExecutor(WORKERS) as pool:
        walks = list(
            pool.map(lambda u: index_shard(u, sizes[u], storage, label_key=label_key, checksum=checksums), list(sizes))
        )
    empty = [w.url for w in walks if w.samples == 0]
    if len(empty) == len(walks):
        found = sorted({e for w in walks for e in w.image_members})
        raise DataError(
            f"--shards {spec}: no sample with an image member ({', '.join(IMAGE_FORMATS)}) in any of the "
            f"{len(walks)} shard(s), e.g. {walks[0].url}" + (f"; image members found: {found}" if found else ""),
            url=walks[0].url,
        )
    labelled = all(w.unlabelled == 0 for w in walks)
    labels = f"json:{label_key}" if label_key else ("cls" if labelled else "none")
    if label_key and not labelled:
        bad = next(w for w in walks if w.unlabelled)
        raise DataError(
            f"--label-key {label_key}: {sum(w.unlabelled for w in walks)} sample(s) have no integer field "
            f"{label_key!r} in their .json member, e.g. in {bad.url}",
            url=bad.url,
        )
    manifests = {}
    for split, part in _split_shards(walks, eval_fraction, seed).items():
        manifests[split] = _write_manifest(split, part, out, storage, labels, spec, label_key, eval_fraction, seed)
    read, stored = sum(w.bytes_read for w in walks), sum(w.bytes for w in walks)
    log(
        f"indexed {sum(w.samples for w in walks)} samples in {len(walks)} shard(s) in {time.perf_counter() - t0:.1f} s: "
        f"{sum(w.requests for w in walks)} ranged reads, {read / 1e6:.2f} MB read of {stored / 1e6:.1f} MB stored "
        f"({read / max(stored, 1):.4f}); labels: {labels}"
    )
    if empty:
        log(f"note: {len(empty)} shard(s) hold no sample with an image member and are left out, e.g. {empty[0]}")
    return manifests


def _split_shards(walks: list[ShardIndex], eval_fraction: float, seed: int) -> dict[str, list[ShardIndex]]:
    """Whole shards to eval, seeded, at least one shard left for training; both in the shards' order."""
    usable = [w for w in walks if w.samples]
    n_eval = min(round(eval_fraction * len(usable)), len(usable) - 1)
    chosen = set(random.Random(seed).sample(range(len(usable)), n_eval)) if n_eval > 0 else set()
    out = {"train": [w for i, w in enumerate(usable) if i not in chosen]}
    if chosen:
        out["eval"] = [w for i, w in enumerate(usable) if i in chosen]
    return out


def _write_manifest(
    split: str,
    walks: list[ShardIndex],
    out: str,
    storage: Any,
    labels: str,
    spec: str,
    label_key: str | None,
    eval_fraction: float,
    seed: int,
) -> Manifest:
    counts: Counter = sum((w.labels for w in walks), Counter())
    num_classes = max(counts) + 1 if labels != "none" and counts else 1
    without = sum(w.without_image for w in walks)
    members = {
        e: f"the image ({IMAGE_FORMATS[e]}), as stored" for e in sorted({e for w in walks for e in w.image_members})
    }
    if labels != "none":
        members["json" if label_key else "cls"] = f"the class index ({labels})"
    m = Manifest(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        split=split,
        num_samples=sum(w.samples for w in walks),
        image_size=None,
        channels=None,
        class_names=[str(c) for c in range(num_classes)] if labels != "none" else ["unlabelled"],
        class_counts=[counts.get(c, 0) for c in range(num_classes)] if labels != "none" else [],
        shards=[ShardEntry(name=w.url, url=w.url, samples=w.samples, bytes=w.bytes, sha256=w.sha256) for w in walks],
        source={
            "kind": INDEX_KIND,
            "shards": spec,
            "label_key": label_key,
            "split": "whole shards",
            "split_seed": seed,
            "eval_fraction": eval_fraction,
        },
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        members=members,
        labels=labels,
        skipped={"no_image_member": without} if without else {},
        url=join_url(out, split, MANIFEST_NAME),
    )
    write_bytes(m.url, m.to_json(), storage, content_type="application/json")
    return m
