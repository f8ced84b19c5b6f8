"""The sampling job: images from a training run's checkpoint, fanned out over Ray, results into its MLflow run.

Everything about the model comes from the MLflow run (``pipeline.tracking.TrackedRun``): the
checkpoint artifact ``checkpoints/images_<N>.pt`` (weights, EMA, U-Net and schedule config,
objective) and the run's ``data.url`` param (the real images for the quality metric). Seeds
``first_seed .. first_seed + num_images - 1`` are cut into batches sampled by a pool of Ray actors
(``pipeline.sample.pool``); the image of a seed does not depend on the batch size or the number of
workers. Results go to the same MLflow run under ``eval/<name>/``; see docs/sampling.md.

Errors: ``ConfigError`` (exit 2) for settings that cannot work with this run; ``JobError`` (exit 1)
when the run, its checkpoint, its data or the cluster cannot be used, naming which.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator, model_validator

from pipeline.cli import JobError
from pipeline.config import ClusterConfig, ConfigError, JobSettings, SampleConfig, StorageConfig, TrackingConfig
from pipeline.data.errors import DataError
from pipeline.ddpm.sampler import SamplerOptions
from pipeline.ddpm.schedule import NoiseSchedule
from pipeline.grid import make_grid
from pipeline.sample.pool import PoolError, PoolStats, SamplingPool, SeedBatch, make_batches
from pipeline.tracking import (
    CHECKPOINT_DIR,
    MODEL_URI_RE,
    TAG_CHECKPOINT,
    TrackedRun,
    TrackingError,
    eval_metric_key,
    model_version,
    promote_if_better,
)

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
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
OUTPUT_FILES = ("grid.png", "samples.npz", "settings.json", "metrics.json")


class SampleSettings(JobSettings):
    """Sample images from a training run's checkpoint and log them, their cost and their quality to its MLflow run."""

    run_id: str | None = Field(
        None, description="MLflow run id of the training run (its checkpoints and config are used); or --model"
    )
    model: str | None = Field(
        None,
        description="registered model version to evaluate, models:/NAME/VERSION or models:/NAME@ALIAS: its source "
        "run and checkpoint are used and the results land in that run; or --run-id",
    )
    promote: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-]{1,100}$",
        description="with --model: set this alias (e.g. champion) on the version if its Frechet distance is lower "
        "than the current holder's (same sampler; no holder: promote); the decision is in the summary",
    )
    image_size: int | None = Field(
        None, ge=1, description="refuse a checkpoint or model that makes images of another size (pixels)"
    )
    num_images: int = Field(1000, ge=1, description="images to generate (seeds first_seed .. first_seed+num_images-1)")
    batch_size: int = Field(
        256, ge=1, description="seeds per batch handed to an actor (results come back batch by batch)"
    )
    chunk: int = Field(
        64,
        ge=1,
        description="images per model call inside an actor, the last call padded: every call has this shape, so "
        "an image does not depend on the batch size (use a multiple of it as --batch-size; larger on GPUs)",
    )
    first_seed: int = Field(0, ge=0, description="seed of the first image; image i has seed first_seed + i")
    workers: int | None = Field(
        None, ge=1, description="sampling actors (one GPU each where there are GPUs); default: cluster.num_workers"
    )
    checkpoint: str = Field(
        "latest",
        description="'latest' or a checkpoint of the run: images_<N> (or just N) for checkpoints/images_<N>.pt",
    )
    ema: bool = Field(True, description="sample with the EMA weights (--no-ema: the raw weights)")
    quality: bool = Field(
        True, description="compute the Frechet distance to the run dataset's eval split (--no-quality: skip)"
    )
    name: str | None = Field(
        None, description="evaluation name (artifact folder eval/<name>/); default <sampler>-<checkpoint>-<UTC time>"
    )
    grid_size: int = Field(64, ge=1, le=1024, description="images (the first seeds) in the sample grid PNG")
    progress: bool = Field(True, description="progress bar (images done / total) on stderr")
    work_dir: str | None = Field(
        None, description="local folder for the outputs before upload (kept); default: a temporary folder (deleted)"
    )
    # An evaluation defaults to DDIM-50: 20x fewer model calls than the training grids' ancestral sampler.
    sample: SampleConfig = SampleConfig(method="ddim")
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    cluster: ClusterConfig = ClusterConfig()

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_name(cls, v: str) -> str:
        if v == "latest" or checkpoint_images(v) is not None:
            return v
        raise ValueError(f"expected 'latest', images_<N> or N, got {v!r}")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        if v is not None and not NAME_RE.match(v):
            raise ValueError("use letters, digits, '.', '_' and '-' (no '/'), starting with a letter or digit")
        return v

    @field_validator("first_seed")
    @classmethod
    def _seed_range(cls, v: int) -> int:
        if v >= 2**62:
            raise ValueError("must be below 2**62")
        return v

    @field_validator("model")
    @classmethod
    def _model_uri(cls, v: str | None) -> str | None:
        if v is not None and not MODEL_URI_RE.match(v):
            raise ValueError(f"expected models:/NAME/VERSION or models:/NAME@ALIAS, got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> SampleSettings:
        if (self.run_id is None) == (self.model is None):
            raise ValueError("run_id / model: give exactly one of --run-id RUN or --model models:/NAME/VERSION")
        if self.promote and not self.model:
            raise ValueError("promote: sets an alias of a registered model version; evaluate it with --model")
        if self.promote and not self.quality:
            raise ValueError("promote: the decision needs the quality metric; drop --no-quality")
        return self

    @model_validator(mode="after")
    def _enough_for_quality(self) -> SampleSettings:
        if self.quality and self.num_images < 2:
            raise ValueError("num_images: the Frechet distance needs at least 2 images (or pass --no-quality)")
        return self


def checkpoint_images(spec: str) -> int | None:
    """N of 'images_<N>', 'images_<N>.pt', 'checkpoints/images_<N>.pt' or 'N'; None otherwise."""
    from pipeline.checkpoint import images_of

    return int(spec) if spec.isdigit() else images_of(spec)


def sampler_tag(options: SamplerOptions, model_evals: int, ema: bool) -> str:
    """Short name of the sampling settings, e.g. ddim50-ema, ancestral1000-ema, ddim20-eta0.5-noclip-raw."""
    o = options
    if o.method == "ddim":
        parts = [f"ddim{model_evals}" + (f"-eta{o.eta:g}" if o.eta else "")]
    else:
        parts = [f"ancestral{model_evals}" + ("-large" if o.variance == "fixed_large" else "")]
    if not o.clip:
        parts.append("noclip")
    parts.append("ema" if ema else "raw")
    return "-".join(parts)


# ------------------------------------------------------------------------------------------------
# The run's checkpoint and data


def choose_checkpoint(checkpoints: dict[int, str], spec: str, run_id: str) -> str:
    """The artifact path of checkpoint ``spec`` ('latest', images_<N> or N) among the run's ``checkpoints``."""
    if not checkpoints:
        raise JobError(
            f"MLflow run {run_id!r} has no sampling checkpoint: no artifact {CHECKPOINT_DIR}/images_<N>.pt "
            "(was it logged by the training job? has it reached its first checkpoint?)"
        )
    if spec == "latest":
        return checkpoints[max(checkpoints)]
    n = checkpoint_images(spec)
    if n not in checkpoints:
        have = ", ".join(Path(p).name for _, p in sorted(checkpoints.items()))
        raise JobError(f"MLflow run {run_id!r} has no checkpoint {CHECKPOINT_DIR}/images_{n:012d}.pt; it has: {have}")
    return checkpoints[n]


@dataclass(frozen=True)
class Checkpoint:
    """A sampling checkpoint of the run, checked to rebuild (the actors rebuild it from ``export``)."""

    artifact: str
    export: bytes
    unet: dict[str, Any]
    schedule: NoiseSchedule
    objective: str
    images_seen: int

    @property
    def name(self) -> str:
        return Path(self.artifact).name.removesuffix(".pt")

    @property
    def shape_hwc(self) -> tuple[int, int, int]:
        size = int(self.unet["image_size"])
        return size, size, int(self.unet["in_channels"])


def load_checkpoint(run: TrackedRun, artifact: str, work: Path, ema: bool) -> Checkpoint:
    """Download ``artifact`` and rebuild schedule and model here, so a bad checkpoint fails before Ray starts."""
    from pipeline.checkpoint import load_sampling_export
    from pipeline.train.state import model_for_sampling

    data = run.download(artifact, work).read_bytes()
    where = f"{artifact!r} of MLflow run {run.run_id!r}"
    try:
        state = load_sampling_export(data)
    except Exception as e:
        raise JobError(f"artifact {where} is not a sampling checkpoint this code can read: {e}") from None
    try:
        schedule = NoiseSchedule.from_dict(state["schedule"])
    except Exception as e:
        raise JobError(f"cannot rebuild the noise schedule from {where}: {e}") from None
    if state["objective"] not in ("eps", "x0", "v"):
        raise JobError(f"{where}: unknown objective {state['objective']!r}")
    try:
        model_for_sampling(state, ema=ema)
    except Exception as e:
        raise JobError(
            f"cannot rebuild the U-Net ({'EMA' if ema else 'raw'} weights) from {where}: "
            f"{type(e).__name__}: {str(e)[:500]}"
        ) from None
    images_seen = int(state.get("images_seen") or checkpoint_images(artifact) or 0)
    return Checkpoint(artifact, data, dict(state["unet"]), schedule, state["objective"], images_seen)


def run_data_config(run: TrackedRun, work: Path) -> dict[str, Any]:
    """data.url / data.image_size / data.channels from the run's params, else its config.json artifact."""
    params = run.params
    out: dict[str, Any] = {k: params[f"data.{k}"] for k in ("url", "image_size", "channels") if f"data.{k}" in params}
    if len(out) < 3:
        cfg = (run.settings(work) or {}).get("data", {})
        out = {k: cfg[k] for k in ("url", "image_size", "channels") if k in cfg} | out
    for k in ("image_size", "channels"):
        if k in out:
            out[k] = int(out[k])
    return out


def check_data_for_quality(data: dict[str, Any], ckpt: Checkpoint, run_id: str) -> None:
    if "url" not in data:
        raise JobError(
            f"MLflow run {run_id!r} has no data.url param or config.json artifact: the quality metric "
            "needs the run's dataset (or pass --no-quality)"
        )
    size, _, channels = ckpt.shape_hwc
    if (data.get("image_size", size), data.get("channels", channels)) != (size, channels):
        raise JobError(
            f"MLflow run {run_id!r}: the checkpoint's U-Net makes {size}x{size}x{channels} images but the "
            f"run's data is {data.get('image_size')}x{data.get('image_size')}x{data.get('channels')}"
        )


def _other_sizes(s: SampleSettings) -> str:
    """For a model: its registered versions and the image sizes they make."""
    if not s.model:
        return ""
    from pipeline.tracking import registered_versions

    name = MODEL_URI_RE.match(s.model)["name"]
    have = [f"{v.version} ({v.tags.get('ddpm.image_size', '?')} px)" for v in registered_versions(s.tracking.uri, name)]
    return f"; versions of {name!r}: {', '.join(have)}"


# ------------------------------------------------------------------------------------------------
# Sampling on Ray


@dataclass
class Sampled:
    images: np.ndarray  # uint8 NHWC memmap, row i = seed first_seed + i
    stats: PoolStats
    workers: int
    use_gpu: bool
    ray_address: str | None


def sample_on_ray(
    s: SampleSettings,
    ckpt: Checkpoint,
    options: SamplerOptions,
    images_path: Path,
    *,
    after_batch: Callable | None = None,
    log: Callable[[str], None] = print,
) -> Sampled:
    """Every seed's image into a memmap at ``images_path``, over a pool of actors on the cluster."""
    import ray

    from pipeline.cluster import connect

    ray_started = not ray.is_initialized()
    try:
        try:
            ray_info = connect(s.cluster.address, log=log)
        except Exception as e:
            raise JobError(f"cannot connect to Ray (cluster.address={s.cluster.address!r}): {e}") from None
        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = s.cluster.use_gpu == "yes" or (s.cluster.use_gpu == "auto" and gpus >= 1)
        if use_gpu and gpus < 1:
            raise JobError("cluster.use_gpu=yes but the Ray cluster has no GPUs")
        workers = s.workers or s.cluster.max_workers
        if use_gpu and workers > gpus:
            # One GPU per actor: the extra actors would never be scheduled.
            log(f"note: {workers} actors asked for but the cluster has {gpus:g} GPU(s): sampling with {int(gpus)}")
            workers = int(gpus)
        if not use_gpu:
            # The pool waits for every actor it asks for; one no node can hold would hold up the whole job.
            threads = s.cluster.threads_per_worker
            fits = sum(int(nd["Resources"].get("CPU", 0) // threads) for nd in ray.nodes() if nd.get("Alive"))
            if fits == 0:
                raise JobError(
                    f"no node of the Ray cluster has {threads} CPUs for one sampling actor "
                    f"(cluster.threads_per_worker={threads})"
                )
            if workers > fits:
                log(f"note: {workers} actors of {threads} CPU(s) asked for but the cluster's nodes hold {fits}")
                workers = fits
        n = s.num_images
        batches = make_batches(s.first_seed, n, s.batch_size)
        evals = options.model_evals(ckpt.schedule.num_timesteps)
        log(
            f"sampling {n} images (seeds {s.first_seed}..{s.first_seed + n - 1}) from {ckpt.artifact} of run "
            f"{s.run_id}: {sampler_tag(options, evals, s.ema)}, {evals} model evaluations per image, "
            f"{len(batches)} batches of <= {s.batch_size}, {workers} {'GPU' if use_gpu else 'CPU'} actor(s), "
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
            options=options,
            workers=workers,
            use_gpu=use_gpu,
            threads=s.cluster.threads_per_worker,
            chunk=s.chunk,
            max_failures=s.cluster.max_failures,
            log=log,
        )
        try:
            stats = pool.run(batches, write, after_batch=after_batch)
        except PoolError as e:
            raise JobError(f"sampling for MLflow run {s.run_id!r} failed: {e}") from None
        finally:
            pool.shutdown()
            if bar is not None:
                bar.close()
        images.flush()
        return Sampled(images, stats, workers, use_gpu, ray_info.get("address"))
    finally:
        if ray_started and ray.is_initialized():
            ray.shutdown()


# ------------------------------------------------------------------------------------------------
# The job


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


def evaluate(s: SampleSettings, *, after_batch: Callable | None = None, log: Callable[[str], None] = print) -> dict:
    """Do the evaluation; returns the summary (the job prints it as JSON)."""
    if not s.tracking.uri:
        raise ConfigError(
            "invalid configuration:\n  tracking.uri: no MLflow tracking server configured "
            "(set MLFLOW_TRACKING_URI, --tracking.uri, or start the local stack)"
        )
    with _work_dir(s.work_dir) as work:
        try:
            version = None
            if s.model:
                # A model version is its source run's checkpoint: evaluate that, into that run.
                version = model_version(s.tracking.uri, s.model)
                s = s.model_copy(update={"run_id": version.run_id, "checkpoint": version.tags[TAG_CHECKPOINT]})
            summary = _evaluate(s, work, after_batch=after_batch, log=log)
            if version is not None:
                summary["model"] = {"uri": s.model, "name": version.name, "version": version.version}
            if s.promote:
                key = next(k for k in summary["metrics"] if re.fullmatch(r".*/fd_[a-z0-9]+", k))
                summary["promotion"] = promote_if_better(
                    s.tracking.uri, version, s.promote, key, summary["metrics"][key]
                )
            return summary
        except (TrackingError, DataError) as e:
            raise JobError(str(e)) from None


def _evaluate(s: SampleSettings, work: Path, *, after_batch: Callable | None, log: Callable[[str], None]) -> dict:
    from pipeline.sample.quality import quality_metrics

    t_job = time.perf_counter()
    run = TrackedRun(s.tracking.uri, s.run_id)
    artifact = choose_checkpoint(run.checkpoints(), s.checkpoint, s.run_id)
    ckpt = load_checkpoint(run, artifact, work / "download", s.ema)
    if s.image_size is not None and ckpt.shape_hwc[0] != s.image_size:
        size, _, channels = ckpt.shape_hwc
        raise JobError(
            f"{s.model or f'MLflow run {s.run_id!r}'} ({artifact}) makes {size}x{size}x{channels} images, "
            f"not {s.image_size}x{s.image_size} as asked (--image-size)" + _other_sizes(s)
        )
    T = ckpt.schedule.num_timesteps
    if s.sample.method == "ddim" and s.sample.steps > T:
        raise ConfigError(
            f"invalid configuration:\n  sample.steps: DDIM steps must be at most T={T}, this run's number of "
            f"diffusion steps (got {s.sample.steps})"
        )
    options = s.sample.options(ckpt.objective)
    evals = options.model_evals(T)
    tag = sampler_tag(options, evals, s.ema)
    name = s.name or f"{tag}-{ckpt.name}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    data_cfg = run_data_config(run, work / "download")
    if s.quality:
        check_data_for_quality(data_cfg, ckpt, s.run_id)

    done = sample_on_ray(s, ckpt, options, work / "images.npy", after_batch=after_batch, log=log)
    images, stats, n = done.images, done.stats, s.num_images
    seeds = np.arange(s.first_seed, s.first_seed + n, dtype=np.int64)
    out = work / "eval" / name
    out.mkdir(parents=True, exist_ok=True)
    make_grid(np.asarray(images[: min(s.grid_size, n)])).save(out / "grid.png")
    np.savez_compressed(out / "samples.npz", images=images, seeds=seeds)  # streams from the memmap
    cost = {
        "images": n,
        "images_per_s": n / stats.sampling_s if stats.sampling_s > 0 else float("nan"),
        "model_evals_per_image": evals,
        "sampling_s": stats.sampling_s,
        "startup_s": stats.startup_s,
        "actor_cpu_s": stats.actor_cpu_s,
        # CPU actors: share of their cores the actors actually got (1.0 = nothing else ran there).
        "actor_cpu_share": None
        if done.use_gpu
        else stats.actor_cpu_s / max(done.workers * s.cluster.threads_per_worker * stats.sampling_s, 1e-9),
        "workers": done.workers,
        "batch_size": s.batch_size,
        "chunk": s.chunk,
        "actor_failures": stats.actor_failures,
        "resubmitted_batches": stats.resubmitted_batches,
        "device": stats.device,
    }
    quality = quality_metrics(images, data_cfg["url"], s.storage, log=log) if s.quality else {}
    cost["wall_s"] = time.perf_counter() - t_job

    figures = {k: cost[k] for k in METRIC_COST_KEYS}
    if quality:
        fs = quality["feature_space"]
        for k in (f"fd_{fs}", f"fd_{fs}_floor", f"fd_{fs}_floor_eval_halves", f"{fs}_eval_accuracy"):
            if quality.get(k) is not None:
                figures[k] = quality[k]
    metrics = {eval_metric_key(tag, k): v for k, v in figures.items()}
    size, _, channels = ckpt.shape_hwc
    settings_doc = {
        "eval_name": name,
        "run_id": s.run_id,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "checkpoint": {
            "artifact": artifact,
            "images_seen": ckpt.images_seen,
            "sha256": hashlib.sha256(ckpt.export).hexdigest(),
            "weights": "ema" if s.ema else "raw",
        },
        "sampler": {**asdict(options), "model_evals_per_image": evals, "tag": tag},
        "schedule": ckpt.schedule.to_dict(),
        "unet": ckpt.unet,
        "seeds": {"first": s.first_seed, "last": s.first_seed + n - 1, "count": n},
        "image_shape_hwc": [size, size, channels],
        "batch_size": s.batch_size,
        "chunk": s.chunk,
        "workers": done.workers,
        "use_gpu": done.use_gpu,
        "threads_per_worker": s.cluster.threads_per_worker,
        "ray": {"address": done.ray_address},
        "data": data_cfg,
        "settings": s.to_public_dict(),
    }
    metrics_doc = {
        "eval_name": name,
        "metric_step": ckpt.images_seen,
        "mlflow_metrics": metrics,
        "cost": cost,
        "quality": quality,
        "per_actor": stats.per_actor,
    }
    (out / "settings.json").write_text(json.dumps(settings_doc, indent=2, default=str) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics_doc, indent=2, default=str) + "\n")
    folder = run.log_evaluation(name, out, metrics, step=ckpt.images_seen)
    fd = (
        f"; Frechet distance {quality[f'fd_{fs}']:.2f} (real-data floor {quality[f'fd_{fs}_floor']:.2f})"
        if quality
        else ""
    )
    note = f"Evaluation {name}: {n} images from {artifact} with {tag}{fd}; grid at {folder}/grid.png."
    try:  # the results are logged already; the description is a convenience
        run.append_note(note)
    except TrackingError as e:
        log(f"WARNING: {e}")
    return {
        "run_id": s.run_id,
        "eval_name": name,
        "artifacts": {k: f"{folder}/{k}" for k in OUTPUT_FILES},
        "metrics": metrics,
        "metric_step": ckpt.images_seen,
        "cost": cost,
        "checkpoint": artifact,
        "local_dir": None if s.work_dir is None else str(out),
    }
