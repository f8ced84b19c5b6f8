"""Benchmark: the shard reader per loader worker at 32, 64 and 256 px, PNG vs JPEG, and ``--index-only``
over 100+ shards.

    python benchmarks/bench_read.py [--images 2000] [--json-out FILE]
    eval "$(python -m infra.stack env)"; python benchmarks/bench_read.py --s3-root s3://ddpm-data/bench-read

Reader: shards in img2dataset's layout (``jpg``/``png``, ``txt``, ``json``) of textured RGB images
(upscaled digits plus noise, so JPEGs are photo-sized) at exactly the size read, indexed in place, then
one epoch of ``ShardReader.iterate`` in the process itself (``data.loader_workers 0``: one worker's
work, decode + conversion + batch assembly), batch 64, on one torch thread; images/s = images / wall
time. One more row reads 256 px JPEGs at 64 px (``data.resize center``: decoded at a reduced scale, then
resized). Index: ``prepare_data --index-only`` of ``--index-shards`` shards of ``--index-samples`` 256 px
JPEGs, in a local folder and, with ``--s3-root``, on S3: seconds, ranged reads, and bytes read over
bytes stored. Everything is written under a temporary folder (and ``--s3-root``) and deleted after.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import DataConfig, StorageConfig
from pipeline.data import ShardReader
from pipeline.data import index as index_module
from pipeline.data.index import index_dataset
from pipeline.data.sources import digits_source
from pipeline.data.storage import delete_urls, join_url, list_urls, write_bytes


def textured(size: int, rng: np.random.Generator, digits: list[np.ndarray]) -> Image.Image:
    """An RGB image of ``size`` px: a digit upscaled, tinted, with noise (JPEG sizes like photos')."""
    d = digits[int(rng.integers(len(digits)))]
    base = np.asarray(Image.fromarray(d).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    tint = rng.uniform(0.3, 1.0, size=3)
    noise = rng.normal(0, 18, size=(size, size, 3))
    return Image.fromarray(np.clip(base[:, :, None] * tint + noise + 40, 0, 255).astype(np.uint8))


def write_shards(root: str, storage, shards: int, per_shard: int, size: int, fmt: str, seed: int = 0) -> int:
    """``shards`` shards of ``per_shard`` samples at ``root``; returns the bytes written."""
    from webdataset import TarWriter

    rng = np.random.default_rng(seed)
    digits = [np.asarray(it.load()) for it in digits_source().items[:200]]
    total, n = 0, 0
    for i in range(shards):
        buf = io.BytesIO()
        with TarWriter(buf, encoder=False) as tw:
            for _ in range(per_shard):
                out = io.BytesIO()
                textured(size, rng, digits).save(out, format={"jpg": "JPEG", "png": "PNG"}[fmt], quality=90)
                label = int(rng.integers(10))
                tw.write(
                    {
                        "__key__": f"{n:09d}",
                        fmt: out.getvalue(),
                        "txt": b"a caption",
                        "json": json.dumps({"label": label}).encode(),
                        "cls": str(label).encode(),
                    }
                )
                n += 1
        data = buf.getvalue()
        write_bytes(join_url(root, f"{i:05d}.tar"), data, storage)
        total += len(data)
    return total


def read_rate(url: str, size: int, batch: int = 64) -> tuple[float, int]:
    """(images/s, images) of one epoch read in-process at ``size`` px."""
    cfg = DataConfig(url=url, image_size=size, channels=3, loader_workers=0, shuffle_buffer=256, partitions=4)
    reader = ShardReader(cfg, None, batch_size=batch, seed=0)
    t0, n = time.perf_counter(), 0
    for b in reader.iterate(0, 0):
        n += len(b)
    return n / (time.perf_counter() - t0), n


def bench_reader(tmp: Path, images: int) -> list[dict]:
    rows = []
    per_shard = max(1, images // 8)
    for stored, read, fmt in [(32, 32, "png"), (32, 32, "jpg"), (64, 64, "png"), (64, 64, "jpg"),
                              (256, 256, "png"), (256, 256, "jpg"), (256, 64, "jpg")]:  # fmt: skip
        shards, ds = tmp / f"{fmt}{stored}", tmp / f"{fmt}{stored}-ds"
        nbytes = write_shards(str(shards), None, 8, per_shard, stored, fmt)
        if not (ds / "train").exists():
            index_dataset(str(shards), str(ds), None, log=lambda _: None)
        rate, n = read_rate(str(ds), read)
        rows.append({"stored_px": stored, "read_px": read, "format": fmt, "images": n, "images_per_s": round(rate, 1),
                     "bytes_per_image": nbytes // (8 * per_shard)})  # fmt: skip
        print(f"reader: {fmt} {stored} px -> {read} px: {rate:,.0f} images/s per worker ({n} images)", flush=True)
        shutil.rmtree(shards), shutil.rmtree(ds)
    return rows


def bench_index(root: str, storage, shards: int, per_shard: int) -> dict:
    stored = write_shards(root, storage, shards, per_shard, 256, "jpg")
    reads = []
    real = index_module.read_range

    def counting(url, start, length, storage=None):
        data = real(url, start, length, storage)
        reads.append(len(data))
        return data

    index_module.read_range = counting
    try:
        t0 = time.perf_counter()
        index_dataset(root, join_url(root, "index"), storage, log=lambda _: None)
        seconds = time.perf_counter() - t0
    finally:
        index_module.read_range = real
    row = {"where": "s3" if root.startswith("s3://") else "local", "shards": shards, "samples": shards * per_shard,
           "seconds": round(seconds, 2), "ranged_reads": len(reads), "bytes_read": sum(reads), "bytes_stored": stored,
           "read_over_stored": round(sum(reads) / stored, 5)}  # fmt: skip
    print(
        f"index ({row['where']}): {shards} shards, {row['samples']} samples in {seconds:.1f} s, {len(reads)} ranged "
        f"reads, {sum(reads) / 1e6:.2f} MB read of {stored / 1e6:.1f} MB stored ({row['read_over_stored']:.4f})",
        flush=True,
    )
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="images per reader configuration")
    ap.add_argument("--index-shards", type=int, default=100)
    ap.add_argument("--index-samples", type=int, default=100, help="samples per shard of the index benchmark")
    ap.add_argument("--s3-root", default=None, help="also index on S3 under this prefix (AWS_* from the environment)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="ddpm-bench-read-"))
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}}
    try:
        result["reader"] = bench_reader(tmp, args.images)
        result["index"] = [bench_index(str(tmp / "index"), None, args.index_shards, args.index_samples)]
        if args.s3_root:
            storage = StorageConfig.from_env(dict(os.environ))
            try:
                result["index"].append(bench_index(args.s3_root, storage, args.index_shards, args.index_samples))
            finally:
                delete_urls(list(list_urls(args.s3_root, storage)), storage)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
