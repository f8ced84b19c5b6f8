"""Benchmark: how fast the shard reader delivers images from S3 vs how fast the trainer consumes them.

    eval "$(python -m infra.stack env)"          # or any S3 via AWS_* / --storage.* flags
    python benchmarks/bench_data.py [--data.url s3://ddpm-data/bench-digits] [--rounds 3] [--json-out FILE]

Reader: ``--epochs`` epochs of ``ShardReader.stream()`` (rank 0 of 1, batch 64, as the trainer reads:
a new DataLoader per epoch, started two batches early) with 1 and 2 DataLoader workers; images/s =
images yielded / wall time, the first epoch's worker start-up included. Trainer: real training steps
of the ``digits`` U-Net (8x8, 1 channel) at batch 64 with 2 torch threads: ``diffusion_loss`` + backward + AdamW step. Measurements are interleaved over
``--rounds`` rounds and medians reported (this machine is noisy). The digits are written first
(``pipeline.data.prepare.ensure_dataset``) if ``--data.url`` holds no dataset. Goal: reader >= 5x
consumption.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from pydantic import Field

from pipeline.cli import JobError, run_job
from pipeline.config import DataConfig, JobSettings, StorageConfig
from pipeline.data import DataError, Manifest, ShardReader
from pipeline.data.prepare import ensure_dataset


class BenchSettings(JobSettings):
    """Reader images/s (S3, 1 and 2 DataLoader workers) vs training consumption (digits U-Net)."""

    data: DataConfig = DataConfig(url="s3://ddpm-data/bench-digits")
    storage: StorageConfig = StorageConfig()
    batch_size: int = Field(64, ge=1, description="per-rank batch of the reader and of the training steps")
    workers: list[int] = Field([1, 2], description="DataLoader worker counts to measure")
    epochs: int = Field(5, ge=1, description="reader epochs per measurement")
    train_steps: int = Field(20, ge=1, description="timed training steps per measurement (after 3 warm-up)")
    threads: int = Field(2, ge=1, description="torch threads of the training steps")
    rounds: int = Field(3, ge=1, description="interleaved rounds; medians are reported")
    json_out: str | None = Field(None, description="also write the results as JSON here")


def reader_rate(s: BenchSettings, m: Manifest, workers: int, epoch0: int) -> dict[str, float]:
    """``epochs`` epochs through ``stream()``, as the trainer reads them (next epoch started early)."""
    data = s.data.model_copy(update={"loader_workers": workers})
    reader = ShardReader(data, s.storage, batch_size=s.batch_size, seed=0, manifest=m)
    reader.load_state_dict({"epoch": epoch0, "batch": 0})
    stream = reader.stream()
    t0 = time.perf_counter()
    images = len(next(stream))
    first = time.perf_counter() - t0
    for _ in range(s.epochs * reader.batches_per_epoch - 1):
        images += len(next(stream))
    wall = time.perf_counter() - t0
    stream.close()
    return {"images_per_s": images / wall, "first_batch_s": first, "images": images}


def trainer_rate(s: BenchSettings, x0: torch.Tensor) -> dict[str, float]:
    from pipeline.config import DiffusionConfig
    from pipeline.ddpm.loss import diffusion_loss
    from pipeline.ddpm.unet import UNet, preset

    torch.set_num_threads(s.threads)
    torch.manual_seed(0)
    model = UNet(preset("digits", image_size=s.data.image_size, in_channels=s.data.channels))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    schedule = DiffusionConfig().build()
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        loss = diffusion_loss(model, schedule, x0, generator=gen).mean
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(s.train_steps):
        step()
    wall = time.perf_counter() - t0
    return {"images_per_s": s.train_steps * len(x0) / wall, "step_s": wall / s.train_steps}


def bench(s: BenchSettings) -> int:
    try:
        m = ensure_dataset(s.data.url, s.storage)
        probe = ShardReader(
            s.data.model_copy(update={"loader_workers": 0}), s.storage, batch_size=s.batch_size, manifest=m
        )
        x0 = next(iter(probe.iterate(0))).images
    except DataError as e:
        raise JobError(str(e)) from e
    if len(x0) < s.batch_size:
        x0 = x0.repeat((s.batch_size + len(x0) - 1) // len(x0), 1, 1, 1)
    x0 = x0[: s.batch_size].contiguous()
    print(
        f"dataset {s.data.url}: {m.num_samples} train images in {len(m.shards)} shards; "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}",
        flush=True,
    )
    load0 = os.getloadavg()[0]
    results: dict[str, list[dict]] = {f"reader_{w}w": [] for w in s.workers} | {"trainer": []}
    for r in range(s.rounds):
        for w in s.workers:
            out = reader_rate(s, m, w, epoch0=r * s.epochs)
            results[f"reader_{w}w"].append(out)
            print(
                f"round {r}: reader {w} worker(s): {out['images_per_s']:.0f} img/s "
                f"(first batch {out['first_batch_s'] * 1000:.0f} ms)",
                flush=True,
            )
        out = trainer_rate(s, x0)
        results["trainer"].append(out)
        print(f"round {r}: trainer: {out['images_per_s']:.1f} img/s ({out['step_s'] * 1000:.0f} ms/step)", flush=True)
    med = {k: statistics.median(x["images_per_s"] for x in v) for k, v in results.items()}
    best = {k: max(x["images_per_s"] for x in v) for k, v in results.items()}
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, torch {torch.__version__}",
        "dataset": s.data.url,
        "endpoint": s.storage.endpoint_url,
        "batch_size": s.batch_size,
        "load_average_before_after": [load0, os.getloadavg()[0]],
        "median_images_per_s": med,
        "best_images_per_s": best,
        "ratio_reader_over_trainer": {k: med[k] / med["trainer"] for k in med if k != "trainer"},
        "ratio_best_reader_over_best_trainer": {k: best[k] / best["trainer"] for k in best if k != "trainer"},
        "rounds": results,
    }
    print(f"\nimages/s over {s.rounds} interleaved rounds (load average {load0:.1f} -> {os.getloadavg()[0]:.1f}):")
    print(f"  {'':<12} {'median':>8} {'best':>8}   median ratio to the trainer")
    for k in med:
        ratio = f"{med[k] / med['trainer']:.1f}x" if k != "trainer" else ""
        print(f"  {k:<12} {med[k]:8.1f} {best[k]:8.1f}   {ratio}")
    if s.json_out:
        Path(s.json_out).write_text(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(BenchSettings, bench, argv, prog="bench_data.py", echo=False)


if __name__ == "__main__":
    sys.exit(main())
