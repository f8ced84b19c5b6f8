"""Writing one dataset split as WebDataset shards + manifest (used by ``pipeline.data.prepare``).

Standard WebDataset tar layout, one sample = three members sharing a key:
``<key>.cls`` (class index as decimal text), ``<key>.json`` (metadata), ``<key>.png`` (the image).
A shard is closed before it would exceed ``shard_samples`` samples or ``shard_bytes`` bytes (tar
headers and padding included; a single larger sample gets a shard of its own). Each shard is
uploaded as soon as it is complete; the manifest is written last.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from datetime import UTC, datetime
from typing import Any

from pipeline.data.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, Manifest, ShardEntry
from pipeline.data.storage import join_url, write_bytes

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads archives to a multiple of this
MEMBERS = {
    "png": "the image: PNG, mode L (1 channel) or RGB (3 channels), image_size x image_size",
    "cls": "class index as decimal text, an index into class_names",
    "json": "metadata: source index or path, label_name, original_size",
}


def member_bytes(n: int) -> int:
    return TAR_BLOCK + -(-n // TAR_BLOCK) * TAR_BLOCK


def archive_bytes(content: int) -> int:
    """Size of a tar archive whose members take ``content`` bytes (end blocks + record padding)."""
    return -(-(content + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


class SplitWriter:
    """Accumulates samples into shards under ``split_url`` and writes the manifest on ``finish()``."""

    def __init__(
        self,
        split_url: str,
        storage: Any,
        *,
        split: str,
        image_size: int,
        channels: int,
        class_names: list[str],
        source: dict[str, Any],
        shard_samples: int,
        shard_bytes: int,
        mtime: float | None = None,
    ) -> None:
        self.split_url = split_url.rstrip("/")
        self.storage = storage
        self.split = split
        self.image_size = image_size
        self.channels = channels
        self.class_names = list(class_names)
        self.source = source
        self.shard_samples = shard_samples
        self.shard_bytes = shard_bytes
        self.mtime = int(time.time() if mtime is None else mtime)  # an int: a float adds pax headers
        self.shards: list[ShardEntry] = []
        self.class_counts = [0] * len(class_names)
        self._pending: list[dict[str, Any]] = []
        self._pending_content = 0

    def add(self, key: str, png: bytes, label: int, meta: dict[str, Any]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        meta = {**meta, "label": label, "label_name": self.class_names[label]}
        sample = {
            "__key__": key,
            "cls": str(label).encode(),
            "json": json.dumps(meta, sort_keys=True).encode(),
            "png": png,
        }
        size = sum(member_bytes(len(v)) for k, v in sample.items() if k != "__key__")
        if self._pending and (
            len(self._pending) >= self.shard_samples or archive_bytes(self._pending_content + size) > self.shard_bytes
        ):
            self._flush()
        self._pending.append(sample)
        self._pending_content += size
        self.class_counts[label] += 1

    def _flush(self) -> None:
        if not self._pending:
            return
        from webdataset import TarWriter

        buf = io.BytesIO()
        with TarWriter(buf, encoder=False, mtime=self.mtime, user="ddpm", group="ddpm") as tw:
            for s in self._pending:
                tw.write(s)
        data = buf.getvalue()
        name = f"shard-{len(self.shards):06d}.tar"
        url = join_url(self.split_url, name)
        write_bytes(url, data, self.storage, content_type="application/x-tar")
        self.shards.append(
            ShardEntry(
                name=name,
                url=url,
                samples=len(self._pending),
                bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
        self._pending = []
        self._pending_content = 0

    def cut(self) -> None:
        """Close the current shard now (the next sample starts a new one)."""
        self._flush()

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards) + len(self._pending)

    def finish(self) -> Manifest:
        """Write the last shard, then the manifest (last, so an incomplete split has none)."""
        self._flush()
        m = Manifest(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            split=self.split,
            num_samples=sum(s.samples for s in self.shards),
            image_size=self.image_size,
            channels=self.channels,
            class_names=self.class_names,
            class_counts=self.class_counts,
            shards=self.shards,
            source=self.source,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            members=MEMBERS,
            url=join_url(self.split_url, MANIFEST_NAME),
        )
        write_bytes(m.url, m.to_json(), self.storage, content_type="application/json")
        return m
