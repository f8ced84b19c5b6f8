"""The sampling job: images from a training run's checkpoint, fanned out over Ray, results into its MLflow run.

As NVlabs/edm's generate.py, in four stages: **plan** (``pipeline.sample.plan``: checkpoint, sampler,
seeds, devices), **sample** (a pool of Ray actors, ``pipeline.sample.pool``: the image of a seed does
not depend on the batch size or the number of workers), **write** (``pipeline.sample.write``: grid,
npz, settings and metrics files) and **publish** (into the same MLflow run under ``eval/<name>/``).
A registered model version is evaluated through ``pipeline.registry.evaluate_model``, which resolves
it to its run and checkpoint and may promote it. See docs/sampling.md.

Errors: ``ConfigError`` (exit 2) for settings that cannot work with this run; a ``JobError``
(``EvaluationError``, ``TrackingError``, ``DataError``; exit 1) when the run, its checkpoint, its data
or the cluster cannot be used, naming which.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import cluster
from pipeline.config import ConfigError
from pipeline.sample.plan import Devices, EvaluationError, Plan, make_plan, place
from pipeline.sample.pool import PoolError, PoolStats, SamplingPool, SeedBatch
from pipeline.sample.quality import quality_metrics
from pipeline.sample.settings import SampleSettings
from pipeline.sample.write import OUTPUT_FILES, cost, mlflow_metrics, write_outputs
from pipeline.tracking import TrackedRun, TrackingError

Log = Callable[[str], None]


def evaluate(s: SampleSettings, *, log: Log = print) -> dict[str, Any]:
    """Plan, sample, write, publish; returns the summary (the job prints it as JSON)."""
    require_tracking(s)
    t_job = time.perf_counter()
    with _work_dir(s.work_dir) as work:
        run = TrackedRun(s.tracking.uri, s.run_id)
        plan = make_plan(s, run, work / "download")
        with ray_session(s.cluster.address, log) as address:
            devices = place(s, log)
            images, stats = sample(s, plan, devices, work / "images.npy", log=log)
        quality = quality_metrics(images, plan.data["url"], s.storage, log=log) if s.quality else {}
        costs = cost(s, plan, devices, stats, wall_s=time.perf_counter() - t_job)
        metrics = mlflow_metrics(plan, costs, quality)
        metrics_doc = {
            "eval_name": plan.name,
            "metric_step": plan.checkpoint.images_seen,
            "mlflow_metrics": metrics,
            "cost": costs,
            "quality": quality,
            "per_actor": stats.per_actor,
        }
        out = work / "eval" / plan.name
        write_outputs(out, s, plan, devices, images, ray_address=address, metrics_doc=metrics_doc)
        summary = publish(run, plan, out, metrics, quality, log=log)
        return summary | {"cost": costs, "local_dir": None if s.work_dir is None else str(out)}


def require_tracking(s: SampleSettings) -> None:
    """``ConfigError`` without an MLflow server: the run, its checkpoints and the results live there."""
    if not s.tracking.uri:
        raise ConfigError(
            "invalid configuration:\n  tracking.uri: no MLflow tracking server configured "
            "(set MLFLOW_TRACKING_URI, --tracking.uri, or start the local stack)"
        )


@contextlib.contextmanager
def ray_session(address: str | None, log: Log) -> Iterator[str | None]:
    """Connected to Ray for the duration; a Ray this call started is shut down after it."""
    import ray

    started = not ray.is_initialized()
    try:
        try:
            info = cluster.connect(address, log=log)
        except Exception as e:
            raise EvaluationError(f"cannot connect to Ray (cluster.address={address!r}): {e}") from None
        yield info.get("address")
    finally:
        if started and ray.is_initialized():
            ray.shutdown()


def sample(
    s: SampleSettings, plan: Plan, devices: Devices, images_path: Path, *, log: Log = print
) -> tuple[np.ndarray, PoolStats]:
    """Every seed's image into a uint8 NHWC memmap at ``images_path`` (row i: seed first_seed + i)."""
    n, ckpt = s.num_images, plan.checkpoint
    log(
        f"sampling {n} images (seeds {s.first_seed}..{s.first_seed + n - 1}) from {ckpt.artifact} of run "
        f"{s.run_id}: {plan.tag}, {plan.model_evals} model evaluations per image, {len(plan.batches)} batches "
        f"of <= {s.batch_size}, {devices.workers} {'GPU' if devices.use_gpu else 'CPU'} actor(s), "
        f"model calls of {s.chunk} images"
    )
    if s.batch_size % s.chunk and s.batch_size < 4 * s.chunk:
        padded = -(-s.batch_size // s.chunk) * s.chunk
        log(
            f"note: --batch-size {s.batch_size} is not a multiple of --chunk {s.chunk}: each batch is computed "
            f"as {padded} images ({padded / s.batch_size:.2f}x the work); choose a multiple"
        )
    images = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=(n, *ckpt.shape_hwc))
    bar = None
    if s.progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="img", desc="sampling", file=sys.stderr, mininterval=1.0, dynamic_ncols=True)

    def write(batch: SeedBatch, imgs: np.ndarray) -> None:
        images[batch.start : batch.start + len(batch)] = imgs
        if bar is not None:
            bar.update(len(batch))

    pool = SamplingPool(
        ckpt.export,
        ema=s.ema,
        options=plan.options,
        workers=devices.workers,
        use_gpu=devices.use_gpu,
        threads=s.cluster.threads_per_worker,
        chunk=s.chunk,
        max_failures=s.cluster.max_failures,
        log=log,
    )
    try:
        stats = pool.run(plan.batches, write)
    except PoolError as e:
        raise EvaluationError(f"sampling for MLflow run {s.run_id!r} failed: {e}") from None
    finally:
        pool.shutdown()
        if bar is not None:
            bar.close()
    images.flush()
    return images, stats


def publish(
    run: TrackedRun, plan: Plan, out: Path, metrics: dict[str, float], quality: dict[str, Any], *, log: Log = print
) -> dict[str, Any]:
    """The files of ``out`` as artifacts eval/<name>/ and ``metrics`` at the checkpoint's images seen,
    plus a line in the run's description; returns the summary's run-side part."""
    ckpt, n = plan.checkpoint, sum(len(b) for b in plan.batches)
    folder = run.log_evaluation(plan.name, out, metrics, step=ckpt.images_seen)
    fd = ""
    if quality:
        fs = quality["feature_space"]
        fd = f"; Frechet distance {quality[f'fd_{fs}']:.2f} (real-data floor {quality[f'fd_{fs}_floor']:.2f})"
    note = f"Evaluation {plan.name}: {n} images from {ckpt.artifact} with {plan.tag}{fd}; grid at {folder}/grid.png."
    try:  # the results are logged already; the description is a convenience
        run.append_note(note)
    except TrackingError as e:
        log(f"WARNING: {e}")
    return {
        "run_id": plan.run_id,
        "eval_name": plan.name,
        "artifacts": {k: f"{folder}/{k}" for k in OUTPUT_FILES},
        "metrics": metrics,
        "metric_step": ckpt.images_seen,
        "checkpoint": ckpt.artifact,
    }


@contextlib.contextmanager
def _work_dir(path: str | None) -> Iterator[Path]:
    """``path`` (kept), or a temporary folder deleted afterwards."""
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    tmp = Path(tempfile.mkdtemp(prefix="ddpm-sample-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
