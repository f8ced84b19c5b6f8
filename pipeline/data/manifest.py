"""The manifest of one dataset split: ``<root>/<split>/manifest.json`` beside its shards.

It is written last by ``jobs/prepare_data.py``, so a split without a manifest is incomplete and is
never read. The reader trusts the manifest's per-shard sample counts to split shards over ranks and
workers; shard URLs are resolved relative to the manifest (``name``), so a copied dataset still reads.

A manifest can also index shards it did not write (``prepare_data --source webdataset --index-only``):
their ``name`` is then the shard's absolute URL, ``image_size``/``channels`` are None (the stored
images are whatever the shards hold; the reader resizes and converts them), ``sha256`` may be empty,
and ``labels`` says where a sample's class comes from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.data.errors import DataError, DatasetMismatchError, ManifestError, NotFoundError
from pipeline.data.storage import join_url, list_urls, read_bytes

FORMAT = "ddpm-webdataset"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
INDEX_KIND = "webdataset-index"  # source.kind of a manifest made by pipeline.data.index  # 1: before skipped / labels / indexed shards
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ShardEntry:
    name: str  # file name relative to the split's directory, e.g. "shard-000000.tar", or an absolute URL
    url: str  # absolute URL at write time (informational; the reader uses the manifest's location)
    samples: int
    bytes: int
    sha256: str  # "" where not computed (an index made without --checksums)


@dataclass(frozen=True)
class Manifest:
    split: str
    num_samples: int
    image_size: int | None  # None: sizes as stored (indexed shards), resized on read
    channels: int | None  # None: modes as stored, converted on read
    class_names: list[str]
    shards: list[ShardEntry]
    class_counts: list[int] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    members: dict[str, str] = field(default_factory=dict)
    labels: str = "cls"  # where a sample's class is: "cls" (its .cls member), "json:<field>", or "none"
    skipped: dict[str, int] = field(default_factory=dict)  # images left out when written, by reason
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    url: str = ""  # where this manifest was read from / will be written (not serialised)

    @property
    def base_url(self) -> str:
        """The split's directory (the manifest's parent)."""
        return self.url.rsplit("/", 1)[0] if "/" in self.url else "."

    def shard_url(self, i: int) -> str:
        name = self.shards[i].name
        return name if is_absolute(name) else join_url(self.base_url, name)

    @property
    def shard_urls(self) -> list[str]:
        return [self.shard_url(i) for i in range(len(self.shards))]

    @property
    def indexed(self) -> bool:
        """Shards indexed where they are (``prepare_data --index-only``), not written by the pipeline."""
        return self.source.get("kind") == INDEX_KIND

    @property
    def digest(self) -> str:
        """The shards' fingerprint (from their sha256s): the same data, the same digest wherever it lies."""
        return hashlib.sha256("".join(s.sha256 or s.name for s in self.shards).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("url")
        order = ["format", "format_version", "split", "num_samples", "image_size", "channels", "class_names"]
        return {k: d[k] for k in order} | {k: v for k, v in d.items() if k not in order}

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=1) + "\n").encode()

    @classmethod
    def from_dict(cls, d: dict[str, Any], url: str = "") -> Manifest:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ManifestError(f"{url}: not a {FORMAT} manifest (format={d.get('format')!r})", url=url)
        if d.get("format_version") not in READABLE_VERSIONS:
            raise ManifestError(
                f"{url}: manifest format_version {d.get('format_version')!r} is not supported "
                f"(this reader knows {', '.join(map(str, READABLE_VERSIONS))}); re-write the dataset with "
                "jobs/prepare_data.py",
                url=url,
            )
        try:
            shards = [ShardEntry(**s) for s in d["shards"]]
            m = cls(**{k: v for k, v in d.items() if k != "shards"}, shards=shards, url=url)
        except (KeyError, TypeError) as e:
            raise ManifestError(f"{url}: malformed manifest: {e}", url=url) from None
        if sum(s.samples for s in m.shards) != m.num_samples:
            raise ManifestError(
                f"{url}: malformed manifest: shard sample counts add up to "
                f"{sum(s.samples for s in m.shards)}, num_samples is {m.num_samples}",
                url=url,
            )
        return m


def is_absolute(name: str) -> bool:
    """A shard name that is a URL or an absolute path (an indexed shard), not a name beside the manifest."""
    return "://" in name or name.startswith("/")


def manifest_url(url: str, split: str | None = None) -> str:
    """The manifest URL for a dataset root + split, a split directory, or a manifest URL itself."""
    if url.endswith(".json"):
        return url
    return join_url(url, split, MANIFEST_NAME) if split else join_url(url, MANIFEST_NAME)


def open_manifest(url: str, storage: Any = None, split: str | None = None) -> Manifest:
    """Read and validate a manifest.

    ``url`` is a dataset root (with ``split``), a split directory, or the manifest's own URL. A
    missing manifest raises ManifestError naming the URL and saying whether the prefix is empty or
    holds an incomplete dataset; wrong keys, a missing bucket or an unreachable endpoint raise the
    errors of ``pipeline.data.storage``.
    """
    murl = manifest_url(url, split)
    try:
        raw = read_bytes(murl, storage)
    except NotFoundError:
        prefix = murl.rsplit("/", 1)[0]
        try:
            n = sum(1 for _ in list_urls(prefix, storage))
        except DataError:
            n = 0
        if n:
            hint = (
                f"the prefix holds {n} object(s) but no manifest: an interrupted or running "
                f"jobs/prepare_data.py? Re-write it with `python jobs/prepare_data.py --out ... --overwrite`"
            )
        else:
            hint = "the prefix is empty: write the dataset first with `python jobs/prepare_data.py --out <root>`"
        raise ManifestError(f"no dataset manifest at {murl}: {hint}", url=murl) from None
    try:
        d = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{murl}: manifest is not valid JSON: {e}", url=murl) from None
    return Manifest.from_dict(d, url=murl)


def check_matches(manifest: Manifest, *, image_size: int, channels: int, resize: str = "never") -> None:
    """Raise DatasetMismatchError naming both values if the manifest disagrees with the config.

    With ``resize`` other than "never" the reader resizes and converts what it reads, so only a
    dataset that cannot be read at all is refused; with "never", the stored size must be the size
    asked for (indexed shards, whose sizes the manifest does not know, are checked image by image as read)."""
    if resize != "never":
        return
    problems = []
    if manifest.image_size is not None and manifest.image_size != image_size:
        problems.append(
            f"image_size: the dataset has {manifest.image_size}, data.image_size is {image_size}, and data.resize "
            "is never (--data.resize center or random resizes on read)"
        )
    if manifest.channels is not None and manifest.channels != channels:
        problems.append(f"channels: the dataset has {manifest.channels}, data.channels is {channels}")
    if problems:
        raise DatasetMismatchError(
            f"dataset {manifest.url} does not match the configuration: "
            + "; ".join(problems)
            + " (change data.* or write a matching dataset with jobs/prepare_data.py)"
        )
