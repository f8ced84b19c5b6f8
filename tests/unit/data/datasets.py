"""Small test datasets of real digits, written with the pipeline's own writer (local or S3), and
helpers that read them back. Shared by tests/unit/data and tests/integration/test_data.py."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import Manifest, ShardReader
from pipeline.data.sources import digits_source, encode_png, prepare_image
from pipeline.data.storage import join_url
from pipeline.data.writer import SplitWriter

REPO_ROOT = Path(__file__).resolve().parents[3]
UNEVEN = [400, 37, 300, 120, 250, 10, 350, 150]  # 1617 samples in deliberately uneven shards

_DIGITS: list[tuple[str, int, bytes]] = []


def digits_samples() -> list[tuple[str, int, bytes]]:
    """(key, label, png) of all 1,797 digits, in source order (cached)."""
    if not _DIGITS:
        for it in digits_source().items:
            _DIGITS.append((it.key, it.label, encode_png(prepare_image(it.load(), 8, 1))))
    return _DIGITS


def write_dataset(
    root: str, storage, shard_sizes: list[int], split: str = "train", seed: int = 0
) -> tuple[Manifest, dict[str, tuple[int, bytes]]]:
    """Digits in shards of exactly the given sizes (shuffled with seed); returns (manifest, key -> (label, png))."""
    samples = digits_samples()[:]
    random.Random(seed).shuffle(samples)
    samples = samples[: sum(shard_sizes)]
    w = SplitWriter(
        join_url(root, split),
        storage,
        split=split,
        image_size=8,
        channels=1,
        class_names=[str(i) for i in range(10)],
        source={"kind": "test"},
        shard_samples=10**9,
        shard_bytes=1 << 40,
    )
    k = 0
    for n in shard_sizes:
        for key, label, png in samples[k : k + n]:
            w.add(key, png, label, {"index": key})
        w.cut()
        k += n
    truth = {key: (label, png) for key, label, png in samples}
    return w.finish(), truth


def expected_image(png: bytes) -> torch.Tensor:
    arr = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    return torch.from_numpy(arr / 127.5 - 1.0)[None]


def read_epoch(data: DataConfig, storage, *, world_size: int, batch_size: int, epoch: int, seed: int = 0):
    """Every rank's (reader, batches) of one epoch (ranks simulated by separate readers); ``batch_size``
    per rank, so the global batch is ``batch_size * world_size``."""
    out = []
    for rank in range(world_size):
        r = ShardReader(data, storage, rank=rank, world_size=world_size, batch_size=batch_size * world_size, seed=seed)
        out.append((r, list(r.iterate(epoch))))
    return out


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        x.index == y.index
        and x.keys == y.keys
        and torch.equal(x.labels, y.labels)
        and torch.equal(x.images, y.images)
        and x.skipped == y.skipped
        for x, y in zip(a, b, strict=True)
    )


def run_prepare_data(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
    """``python jobs/prepare_data.py ARGS`` as a user runs it; the CompletedProcess (text output)."""
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "jobs" / "prepare_data.py"), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def save_image(path: Path, img: Image.Image, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)


def write_foreign_shards(
    root: str, storage, shard_sizes: list[int], *, fmt: str = "jpg", cls: bool = False, seed: int = 0
) -> list[dict]:
    """Shards as other tools write them (img2dataset's layout, with plain ``webdataset.TarWriter``):
    ``{00000..}.tar`` of ``<key>.jpg`` (RGB digits upscaled to 16-40 px, not square), ``<key>.txt`` (a
    caption) and ``<key>.json`` (``label`` and a url), plus ``<key>.cls`` with ``cls``. Returns each
    sample's truth in write order: key, shard url, label, (width, height)."""
    from webdataset import TarWriter

    from pipeline.data.storage import write_bytes

    rng = random.Random(seed)
    samples = digits_samples()
    pil_format = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    truth, n = [], 0
    for i, size in enumerate(shard_sizes):
        url = join_url(root, f"{i:05d}.tar")
        buf = io.BytesIO()
        with TarWriter(buf, encoder=False) as tw:
            for _ in range(size):
                key, label, png = samples[n % len(samples)]
                w, h = rng.randrange(16, 41), rng.randrange(16, 41)
                img = Image.open(io.BytesIO(png)).convert("RGB").resize((w, h))
                out = io.BytesIO()
                img.save(out, format=pil_format)
                sample = {
                    "__key__": f"{n:09d}",
                    fmt: out.getvalue(),
                    "txt": f"a handwritten {label}".encode(),
                    "json": json.dumps({"label": label, "url": f"http://example.invalid/{key}.png"}).encode(),
                }
                if cls:
                    sample["cls"] = str(label).encode()
                tw.write(sample)
                truth.append({"key": f"{n:09d}", "url": url, "label": label, "size": (w, h)})
                n += 1
        write_bytes(url, buf.getvalue(), storage)
    return truth


def train_briefly(url: str, storage, *flags: str) -> tuple[dict, list[dict]]:
    """A few real training steps (``train_worker`` in this process, tiny U-Net, 96 images, a checkpoint
    and a validation at the end) on the dataset at ``url``; returns (its result, what it reported)."""
    from pipeline.config import Settings
    from pipeline.train.checkpointer import Session
    from pipeline.train.loop import train_worker

    settings = Settings.from_cli(
        ["--model.preset", "tiny", "--diffusion.num-timesteps", "100", "--data.url", url, "--data.partitions", "2",
         "--train.batch-size", "16", "--train.total-images", "96", "--train.checkpoint-every-images", "96",
         "--train.sample-every-images", "0", "--train.warmup-images", "16", "--train.validate-every-images", "96",
         "--train.validate-images", "8", *flags]
    )  # fmt: skip
    settings.storage, settings.tracking.uri = storage, None
    reports: list[dict] = []
    result = train_worker(settings, Session(report=lambda metrics, directory, name: reports.append(metrics)))
    return result, reports


def image_ranges(tar: bytes) -> list[tuple[int, int]]:
    """[start, end) of every image member's data in a tar archive."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        return [(ti.offset_data, ti.offset_data + ti.size) for ti in tf if ti.name.endswith((".jpg", ".png", ".webp"))]


def assert_no_image_byte_read(reads: list[tuple[str, int, int]], fetch) -> None:
    """No (url, start, length) of ``reads`` overlaps an image member's data; ``fetch(url)`` gives a shard's bytes."""
    shards: dict[str, list[tuple[int, int]]] = {}
    for url, start, n in reads:
        for a, b in shards.setdefault(url, image_ranges(fetch(url))):
            assert start + n <= a or start >= b, f"read {start}..{start + n} overlaps an image at {a}..{b} in {url}"
