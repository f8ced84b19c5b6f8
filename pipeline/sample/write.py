"""An evaluation's files, written locally before they are published to the run: the grid, every
image with its seed, what was done (settings.json) and what it cost and scored (metrics.json)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.grid import make_grid
from pipeline.sample.plan import Devices, Plan
from pipeline.sample.pool import PoolStats
from pipeline.sample.settings import SampleSettings
from pipeline.tracking import eval_metric_key

OUTPUT_FILES = ("grid.png", "samples.npz", "settings.json", "metrics.json")
# Cost figures also logged as MLflow metrics (all of them are in metrics.json).
METRIC_COST_KEYS = (
    "images",
    "images_per_s",
    "model_evals_per_image",
    "sampling_s",
    "wall_s",
    "workers",
    "actor_failures",
)


def cost(s: SampleSettings, plan: Plan, devices: Devices, stats: PoolStats, wall_s: float) -> dict[str, Any]:
    n = s.num_images
    return {
        "images": n,
        "images_per_s": n / stats.sampling_s if stats.sampling_s > 0 else float("nan"),
        "model_evals_per_image": plan.model_evals,
        "sampling_s": stats.sampling_s,
        "startup_s": stats.startup_s,
        "actor_cpu_s": stats.actor_cpu_s,
        # CPU actors: share of their cores the actors actually got (1.0 = nothing else ran there).
        "actor_cpu_share": None
        if devices.use_gpu
        else stats.actor_cpu_s / max(devices.workers * s.cluster.threads_per_worker * stats.sampling_s, 1e-9),
        "workers": devices.workers,
        "batch_size": s.batch_size,
        "chunk": s.chunk,
        "actor_failures": stats.actor_failures,
        "resubmitted_batches": stats.resubmitted_batches,
        "device": stats.device,
        "wall_s": wall_s,
    }


def mlflow_metrics(plan: Plan, cost: dict[str, Any], quality: dict[str, Any]) -> dict[str, float]:
    """The figures logged as MLflow metrics, keyed eval/<sampler tag>/<figure>."""
    figures = {k: cost[k] for k in METRIC_COST_KEYS}
    if quality:
        fs = quality["feature_space"]
        for k in (f"fd_{fs}", f"fd_{fs}_floor", f"fd_{fs}_floor_eval_halves", f"{fs}_eval_accuracy"):
            if quality.get(k) is not None:
                figures[k] = quality[k]
    return {eval_metric_key(plan.tag, k): v for k, v in figures.items()}


def write_outputs(
    out: Path,
    s: SampleSettings,
    plan: Plan,
    devices: Devices,
    images: np.ndarray,
    *,
    ray_address: str | None,
    metrics_doc: dict[str, Any],
) -> None:
    """grid.png (the first seeds), samples.npz (images and seeds), settings.json and metrics.json into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    n = s.num_images
    make_grid(np.asarray(images[: min(s.grid_size, n)])).save(out / "grid.png")
    seeds = np.arange(s.first_seed, s.first_seed + n, dtype=np.int64)
    np.savez_compressed(out / "samples.npz", images=images, seeds=seeds)  # streams from the memmap
    ckpt = plan.checkpoint
    settings_doc = {
        "eval_name": plan.name,
        "run_id": plan.run_id,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "checkpoint": {
            "artifact": ckpt.artifact,
            "images_seen": ckpt.images_seen,
            "sha256": hashlib.sha256(ckpt.export).hexdigest(),
            "weights": "ema" if s.ema else "raw",
        },
        "sampler": {**asdict(plan.options), "model_evals_per_image": plan.model_evals, "tag": plan.tag},
        "schedule": ckpt.schedule.to_dict(),
        "unet": ckpt.unet,
        "seeds": {"first": s.first_seed, "last": s.first_seed + n - 1, "count": n},
        "image_shape_hwc": list(ckpt.shape_hwc),
        "batch_size": s.batch_size,
        "chunk": s.chunk,
        "workers": devices.workers,
        "use_gpu": devices.use_gpu,
        "threads_per_worker": s.cluster.threads_per_worker,
        "ray": {"address": ray_address},
        "data": plan.data,
        "settings": s.to_public_dict(),
    }
    (out / "settings.json").write_text(json.dumps(settings_doc, indent=2, default=str) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics_doc, indent=2, default=str) + "\n")
