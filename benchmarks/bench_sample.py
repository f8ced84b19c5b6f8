#!/usr/bin/env python
"""Benchmark of the evaluation sampling job (jobs/sample.py) on one trained model, in one run.

    python benchmarks/bench_sample.py                      # trains a digits model for --train-seconds first
    python benchmarks/bench_sample.py --run-id RUN         # or uses an existing training run
    python benchmarks/bench_sample.py --out bench.json     # figures also as JSON

Measures, on the same checkpoint:
  1. scaling: DDIM-50 with 2 actors vs 1 actor (1 thread each), the same seeds, interleaved
     ``--repeats`` times; images/s from the pool's sampling time (actors already loaded);
  2. DDIM-50 vs 1000-step ancestral (2 actors): images/s ratio and the quality metric of each.

Needs the stack's variables (``eval "$(python -m infra.stack env)"``) or your services' own. The model is
trained in this process and logged as the training job logs a run (``benchmarks.local_run``).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from benchmarks import local_run
from pipeline.cli import JobError, run_job
from pipeline.config import ConfigError, JobSettings, StorageConfig, TrackingConfig
from pipeline.sample.evaluate import evaluate
from pipeline.sample.settings import SampleSettings
from pipeline.tracking import TrackedRun


class BenchSettings(JobSettings):
    """Benchmark jobs/sample.py: 2 actors vs 1, DDIM-50 vs 1000-step ancestral (speed and quality)."""

    run_id: str | None = Field(None, description="MLflow run to evaluate; default: train a digits model first")
    data_url: str = Field("s3://ddpm-data/bench-sample/digits", description="digits dataset for the trained model")
    train_seconds: float = Field(600, gt=0, description="training time of the digits model (no --run-id)")
    preset: str = Field("digits", description="U-Net preset of the trained model")
    scaling_images: int = Field(1024, ge=1, description="images per run of the 1-vs-2-actor comparison")
    scaling_batch: int = Field(128, ge=1, description="batch size of the 1-vs-2-actor comparison")
    repeats: int = Field(2, ge=1, description="interleaved repeats of the 1-vs-2-actor comparison")
    quality_images: int = Field(512, ge=1, description="images for DDIM-50 vs ancestral-1000 (speed and quality)")
    quality_batch: int = Field(128, ge=1, description="batch size for DDIM-50 vs ancestral-1000")
    parts: list[Literal["scaling", "quality"]] = Field(
        ["scaling", "quality"], description="what to measure: scaling (1 vs 2 actors), quality (DDIM vs ancestral)"
    )
    out: str | None = Field(None, description="also write the figures to this JSON file")
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()


def _sample(b: BenchSettings, run_id: str, *args: str) -> dict[str, Any]:
    s = SampleSettings.from_cli(["--run-id", run_id, "--no-progress", *args])
    return evaluate(s.model_copy(update={"storage": b.storage, "tracking": b.tracking}))


def _same_npz(uri: str, run_id: str, *paths: str) -> bool:
    import numpy as np

    run = TrackedRun(uri, run_id)
    arrays = []
    with tempfile.TemporaryDirectory() as d:
        for i, p in enumerate(paths):
            with np.load(run.download(p, f"{d}/{i}")) as z:
                arrays.append((z["images"], z["seeds"]))
    return all(np.array_equal(a[0], arrays[0][0]) and np.array_equal(a[1], arrays[0][1]) for a in arrays[1:])


def digits_dataset(url: str, storage: StorageConfig) -> None:
    """The digits at ``url`` (20% held out for the quality metric), written by prepare_data unless there."""
    from jobs import prepare_data
    from pipeline.data import ManifestError, open_manifest

    try:
        open_manifest(url, storage, "eval")
        open_manifest(url, storage, "train")
        return
    except ManifestError:
        pass
    argv = ["--out", url, "--eval-fraction", "0.2", "--no-progress", "--overwrite"]
    if prepare_data.main(argv) != 0:
        raise JobError(f"prepare_data {' '.join(argv)} failed")


def main(argv: list[str] | None = None) -> int:
    return run_job(BenchSettings, bench, argv, prog="bench_sample.py", echo=False)


def bench(b: BenchSettings) -> None:
    if not b.tracking.uri:
        raise ConfigError(
            "invalid configuration:\n  tracking.uri: no MLflow server (start the stack or set MLFLOW_TRACKING_URI)"
        )
    import platform

    import torch

    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    run_id = b.run_id
    if run_id is None:
        digits_dataset(b.data_url, b.storage)
        state = local_run.train_locally(
            b.data_url, b.storage, preset=b.preset, seconds=b.train_seconds, batch_size=128, lr=1e-3, ema_decay=0.999
        )
        run_id = local_run.log_as_training_run(
            state, tracking_uri=b.tracking.uri, data_url=b.data_url, preset=b.preset, experiment=b.tracking.experiment
        )
        report["trained"] = {
            "preset": b.preset,
            "seconds": b.train_seconds,
            "images_seen": state.images_seen,
            "steps": state.step_count,
        }
        print(f"training run logged: {run_id}")
    report["run_id"] = run_id
    stamp = time.strftime("%Y%m%dT%H%M%S")

    if "scaling" in b.parts:
        _scaling(b, run_id, stamp, report)
    if "quality" in b.parts:
        _quality(b, run_id, stamp, report)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if b.out:
        Path(b.out).write_text(text + "\n")


def _scaling(b: BenchSettings, run_id: str, stamp: str, report: dict[str, Any]) -> None:
    """1 vs 2 actors, the same seeds, interleaved."""
    common = [
        "--num-images",
        str(b.scaling_images),
        "--batch-size",
        str(b.scaling_batch),
        "--sample.method",
        "ddim",
        "--sample.steps",
        "50",
        "--no-quality",
        "--cluster.threads-per-worker",
        "1",
    ]
    rates: dict[int, list[float]] = {1: [], 2: []}
    per_cpu: dict[int, list[float]] = {1: [], 2: []}
    shares: dict[int, list[float]] = {1: [], 2: []}
    loads: list[float] = []
    names: dict[int, str] = {}
    for r in range(b.repeats):
        for w in (1, 2) if r % 2 == 0 else (2, 1):
            out = _sample(b, run_id, *common, "--workers", str(w), "--name", f"bench-scaling-w{w}-r{r}-{stamp}")
            cost = out["cost"]
            rates[w].append(cost["images_per_s"])
            per_cpu[w].append(cost["images"] / cost["actor_cpu_s"])
            shares[w].append(cost["actor_cpu_share"])
            loads.append(os.getloadavg()[0])
            names[w] = out["artifacts"]["samples.npz"]
            print(
                f"scaling: {w} actor(s), repeat {r}: {cost['images_per_s']:.2f} images/s, "
                f"{per_cpu[w][-1]:.2f} images per actor CPU second, actors got {cost['actor_cpu_share']:.0%} "
                f"of their cores, load average {loads[-1]:.1f}",
                flush=True,
            )
    speedups = [two / one for one, two in zip(rates[1], rates[2], strict=True)]
    # The same seeds through 1 actor and 2, and with another batch size: the same bytes?
    other = _sample(
        b, run_id, *common[:2], "--batch-size", "96", *common[4:], "--workers", "2", "--name", f"bench-batch96-{stamp}"
    )
    identical = _same_npz(b.tracking.uri, run_id, names[1], names[2], other["artifacts"]["samples.npz"])
    report["scaling"] = {
        "images": b.scaling_images,
        "batch_size": b.scaling_batch,
        "sampler": "ddim50",
        "images_per_s_1_actor": rates[1],
        "images_per_s_2_actors": rates[2],
        "speedup_per_repeat": speedups,
        "speedup_median": statistics.median(speedups),
        "images_per_actor_cpu_s_1_actor": per_cpu[1],
        "images_per_actor_cpu_s_2_actors": per_cpu[2],
        "actor_cpu_share_1_actor": shares[1],
        "actor_cpu_share_2_actors": shares[2],
        "load_average_1min_after_each_run": loads,
        "identical_images_1_vs_2_actors_and_batch_96": identical,
    }


def _quality(b: BenchSettings, run_id: str, stamp: str, report: dict[str, Any]) -> None:
    """DDIM-50 vs ancestral-1000 on 2 actors: speed and quality."""
    q = {}
    for method in ("ddim", "ancestral"):
        args = [
            "--num-images",
            str(b.quality_images),
            "--batch-size",
            str(b.quality_batch),
            "--sample.method",
            method,
            "--sample.steps",
            "50",
            "--workers",
            "2",
        ]
        out = _sample(b, run_id, *args, "--name", f"bench-{method}-{stamp}")
        tag = next(iter(out["metrics"])).split("/")[1]  # every key is eval/<tag>/<metric>
        m = {k.split("/", 2)[2]: v for k, v in out["metrics"].items()}
        cost = out["cost"]
        m |= {
            "images_per_actor_cpu_s": cost["images"] / cost["actor_cpu_s"],
            "actor_cpu_share": cost["actor_cpu_share"],
            "load_average_1min_after": os.getloadavg()[0],
        }
        q[tag] = {"eval_name": out["eval_name"], **m}
        print(f"{tag}: {json.dumps(m, indent=None)}", flush=True)
    (d_tag, d), (a_tag, a) = list(q.items())
    fd_key = next(k for k in d if k.startswith("fd_") and not k.endswith(("_floor", "_floor_eval_halves")))
    report["ddim_vs_ancestral"] = {
        "images": b.quality_images,
        "batch_size": b.quality_batch,
        "workers": 2,
        "runs": q,
        "speed_ratio": d["images_per_s"] / a["images_per_s"],
        "speed_ratio_per_actor_cpu_s": d["images_per_actor_cpu_s"] / a["images_per_actor_cpu_s"],
        "model_evals_ratio": a["model_evals_per_image"] / d["model_evals_per_image"],
        "metric": fd_key,
        f"{fd_key}_ddim": d[fd_key],
        f"{fd_key}_ancestral": a[fd_key],
        "floor": d.get(f"{fd_key}_floor"),
        "floor_eval_halves": d.get(f"{fd_key}_floor_eval_halves"),
    }


if __name__ == "__main__":
    sys.exit(main())
