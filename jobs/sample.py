#!/usr/bin/env python
"""Evaluation sampling: images from a training run's checkpoint, fanned out over Ray, results into MLflow.

    python jobs/sample.py --run-id RUN [--num-images 1000] [--method ddim --steps 50 | --method ancestral]
                          [--checkpoint latest|images_<N>] [--ema/--no-ema] [--workers N] ...
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/sample.py --run-id RUN

Everything about the model comes from the MLflow run: the checkpoint artifact
``checkpoints/images_<N>.pt`` (weights, EMA, U-Net and schedule config, objective) and the run's
``data.url`` param (the real images for the quality metric). Seeds ``first_seed ..
first_seed + num_images - 1`` are cut into batches sampled by a pool of Ray actors
(``pipeline.sample.pool``); the image of a seed does not depend on the batch size or the number of
workers. Results go to the same MLflow run under ``eval/<eval-name>/``; see docs/sampling.md.

Exit status: 0 done, 1 the run / checkpoint / data / cluster cannot be used (the message says
which), 2 invalid configuration (the message names the field).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
from pydantic import Field, field_validator, model_validator  # noqa: E402

from pipeline.config import (  # noqa: E402
    ClusterConfig,
    ConfigError,
    JobSettings,
    StorageConfig,
    TrackingConfig,
)
from pipeline.grid import make_grid  # noqa: E402

CHECKPOINT_DIR = "checkpoints"
EVAL_DIR = "eval"
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


class SampleSettings(JobSettings):
    """Sample images from a training run's checkpoint and log them, their cost and their quality to its MLflow run."""

    run_id: str = Field(..., description="MLflow run id of the training run (its checkpoints and config are used)")
    num_images: int = Field(1000, ge=1, description="images to generate (seeds first_seed .. first_seed+num_images-1)")
    batch_size: int = Field(
        256, ge=1, description="seeds per batch handed to an actor (results come back batch by batch)"
    )
    method: Literal["ancestral", "ddim"] = Field(
        "ddim", description="ddim (respaced, --steps model calls) or ancestral (Algorithm 2: T model calls)"
    )
    steps: int = Field(50, ge=1, description="DDIM: respaced steps (ignored by ancestral, which takes all T)")
    eta: float = Field(0.0, ge=0, description="DDIM: 0 deterministic, 1 ancestral-like noise")
    variance: Literal["fixed_small", "fixed_large"] = Field(
        "fixed_small", description="ancestral: sigma_t^2 = beta-tilde_t (fixed_small) or beta_t (fixed_large)"
    )
    clip: bool = Field(True, description="clip the predicted x0 to [-1, 1] at every step")
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

    @model_validator(mode="after")
    def _enough_for_quality(self) -> SampleSettings:
        if self.quality and self.num_images < 2:
            raise ValueError("num_images: the Frechet distance needs at least 2 images (or pass --no-quality)")
        return self

    @field_validator("first_seed")
    @classmethod
    def _seed_range(cls, v: int) -> int:
        if v >= 2**62:
            raise ValueError("must be below 2**62")
        return v


class JobError(RuntimeError):
    """The run, its checkpoint, its data or the cluster cannot be used; the message says which and why."""


def checkpoint_images(spec: str) -> int | None:
    """N of 'images_<N>', 'images_<N>.pt', 'checkpoints/images_<N>.pt' or 'N'; None otherwise."""
    from pipeline.checkpoint import images_of

    return int(spec) if spec.isdigit() else images_of(spec)


def sampler_tag(method: str, steps: int, eta: float, variance: str, clip: bool, ema: bool) -> str:
    """Short name of the sampling settings, e.g. ddim50-ema, ancestral1000-ema, ddim20-eta0.5-noclip-raw."""
    parts = [f"ddim{steps}" + (f"-eta{eta:g}" if eta else "")] if method == "ddim" else [f"ancestral{steps}"]
    if method == "ancestral" and variance == "fixed_large":
        parts.append("large")
    if not clip:
        parts.append("noclip")
    parts.append("ema" if ema else "raw")
    return "-".join(parts)


# ------------------------------------------------------------------------------------------------
# Reading the run


def _mlflow_client(s: SampleSettings):
    if not s.tracking.uri:
        raise ConfigError(
            "invalid configuration:\n  tracking.uri: no MLflow tracking server configured "
            "(set MLFLOW_TRACKING_URI, --tracking.uri, or start the local stack)"
        )
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=s.tracking.uri)


def get_run(client, run_id: str, uri: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as e:
        if getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(e).lower():
            raise JobError(f"MLflow run {run_id!r} not found at {uri}") from None
        raise JobError(f"cannot read MLflow run {run_id!r} at {uri}: {e}") from None
    except Exception as e:  # connection refused, DNS, ...
        raise JobError(f"cannot reach the MLflow tracking server {uri} to read run {run_id!r}: {e}") from None


def list_checkpoints(client, run_id: str) -> dict[int, str]:
    """images_seen -> artifact path of every sampling checkpoint of the run."""
    from pipeline.checkpoint import images_of

    out = {}
    for f in client.list_artifacts(run_id, CHECKPOINT_DIR):
        n = images_of(f.path)
        if not f.is_dir and f.path.endswith(".pt") and n is not None:
            out[n] = f.path
    return out


def choose_checkpoint(checkpoints: dict[int, str], spec: str, run_id: str) -> str:
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


def run_data_config(client, run, run_id: str, work: Path) -> dict[str, Any]:
    """data.url / data.image_size / data.channels from the run's params, else its config.json artifact."""
    params = run.data.params
    out = {k: params[f"data.{k}"] for k in ("url", "image_size", "channels") if f"data.{k}" in params}
    if len(out) < 3:
        try:
            path = client.download_artifacts(run_id, "config.json", str(work))
            cfg = json.loads(Path(path).read_text()).get("data", {})
            out = {k: cfg[k] for k in ("url", "image_size", "channels") if k in cfg} | out
        except Exception:  # no config.json: reported below if the values are needed
            pass
    if "image_size" in out:
        out["image_size"] = int(out["image_size"])
    if "channels" in out:
        out["channels"] = int(out["channels"])
    return out


def load_checkpoint(client, run_id: str, artifact: str, work: Path, ema: bool) -> tuple[bytes, dict, Any, Any]:
    """(bytes, export dict, model, schedule), each rebuilt here so a bad checkpoint fails before Ray starts."""
    from pipeline.checkpoint import load_sampling_export
    from pipeline.ddpm.schedule import NoiseSchedule
    from pipeline.train.state import model_for_sampling

    try:
        local = client.download_artifacts(run_id, artifact, str(work))
        data = Path(local).read_bytes()
    except Exception as e:
        raise JobError(f"cannot download artifact {artifact!r} of MLflow run {run_id!r}: {e}") from None
    try:
        state = load_sampling_export(data)
    except Exception as e:
        raise JobError(
            f"artifact {artifact!r} of MLflow run {run_id!r} is not a sampling checkpoint this code can read: {e}"
        ) from None
    try:
        schedule = NoiseSchedule.from_dict(state["schedule"])
    except Exception as e:
        raise JobError(f"cannot rebuild the noise schedule from {artifact!r} of run {run_id!r}: {e}") from None
    if state["objective"] not in ("eps", "x0", "v"):
        raise JobError(f"{artifact!r} of run {run_id!r}: unknown objective {state['objective']!r}")
    try:
        model = model_for_sampling(state, ema=ema)
    except Exception as e:
        which = "EMA" if ema else "raw"
        raise JobError(
            f"cannot rebuild the U-Net ({which} weights) from {artifact!r} of run {run_id!r}: "
            f"{type(e).__name__}: {str(e)[:500]}"
        ) from None
    return data, state, model, schedule


# ------------------------------------------------------------------------------------------------
# Quality


def quality_metrics(
    images: np.ndarray,
    data_url: str,
    storage: StorageConfig,
    *,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Frechet distance of ``images`` (uint8 NHWC, may be a memmap) to the eval split, and the real floor.

    Floor: the same distance between real images and the eval split: the first images of the
    *train* split (its samples are shuffled when written), as many as were generated (at most the
    whole split). Same reference, same sample size as the generated set. Also reported: two
    disjoint halves of the eval split (smaller samples, so higher).
    """
    from pipeline.data import load_split_arrays
    from pipeline.sample.quality import frechet_distance, gaussian_stats, load_or_train_feature_net

    t0 = time.perf_counter()
    ev = load_split_arrays(data_url, storage, "eval")
    if ev.images.shape[1:] != images.shape[1:]:
        raise JobError(
            f"the eval split at {data_url} holds {ev.images.shape[1:]} images (HWC) but the model makes "
            f"{images.shape[1:]}: not the run's dataset?"
        )
    if len(ev.images) < 4:
        raise JobError(f"the eval split at {data_url} has {len(ev.images)} images: too few for a Frechet distance")
    # Reads the train split only if the feature net has to be trained (it is cached after that).
    net = load_or_train_feature_net(data_url, storage, eval_split=(ev.images, ev.labels), log=log)
    tr = load_split_arrays(data_url, storage, "train", limit=len(images))
    name = net.name
    f_eval = net.features(ev.images)
    f_gen = net.features(images)
    stats_eval = gaussian_stats(f_eval)
    fd = frechet_distance(*gaussian_stats(f_gen), *stats_eval)
    floor = frechet_distance(*gaussian_stats(net.features(tr.images)), *stats_eval)
    n_floor = len(tr.images)
    perm = np.random.default_rng(1).permutation(len(f_eval))
    half = len(perm) // 2
    floor_halves = frechet_distance(
        *gaussian_stats(f_eval[perm[:half]]), *gaussian_stats(f_eval[perm[half : 2 * half]])
    )
    return {
        "feature_space": name,
        f"fd_{name}": fd,
        f"fd_{name}_floor": floor,
        f"fd_{name}_floor_eval_halves": floor_halves,
        f"{name}_eval_accuracy": net.info.get("eval_accuracy"),
        "reference": f"{data_url} eval split ({len(ev.images)} images)",
        "floor": f"the first {n_floor} train images vs the eval split",
        "floor_eval_halves": f"two disjoint halves of the eval split ({half} images each)",
        "generated_images": len(images),
        "feature_net": {
            "name": name,
            "key": net.key,
            "url": net.url,
            "config": net.config.to_dict(),
            **net.info,
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }


# ------------------------------------------------------------------------------------------------
# The job


def run(s: SampleSettings, *, after_batch: Callable | None = None, log: Callable[[str], None] = print) -> dict:
    """Do the evaluation; returns the summary (also printed as JSON by ``main``)."""
    from pipeline.ddpm.sampler import SamplerOptions

    t_job = time.perf_counter()
    client = _mlflow_client(s)
    mlrun = get_run(client, s.run_id, s.tracking.uri)
    tmp_owner = s.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="ddpm-sample-")) if tmp_owner else Path(s.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ray_started = False
    try:
        artifact = choose_checkpoint(list_checkpoints(client, s.run_id), s.checkpoint, s.run_id)
        data, state, model, schedule = load_checkpoint(client, s.run_id, artifact, work / "download", s.ema)
        unet = state["unet"]
        size, channels = int(unet["image_size"]), int(unet["in_channels"])
        images_seen = int(state.get("images_seen") or checkpoint_images(artifact) or 0)
        ckpt_name = Path(artifact).name.removesuffix(".pt")
        T = schedule.num_timesteps
        if s.method == "ddim" and s.steps > T:
            raise ConfigError(
                f"invalid configuration:\n  steps: DDIM steps must be at most T={T}, this run's number of "
                f"diffusion steps (got {s.steps})"
            )
        options = {
            "method": s.method,
            "steps": s.steps if s.method == "ddim" else None,
            "eta": s.eta,
            "variance": s.variance,
            "clip": s.clip,
            "objective": state["objective"],
        }
        evals = SamplerOptions(**options).model_evals(T)
        tag = sampler_tag(s.method, evals, s.eta, s.variance, s.clip, s.ema)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        name = s.name or f"{tag}-{ckpt_name}-{stamp}"
        data_cfg = run_data_config(client, mlrun, s.run_id, work / "download")
        if s.quality:
            if "url" not in data_cfg:
                raise JobError(
                    f"MLflow run {s.run_id!r} has no data.url param or config.json artifact: the quality metric "
                    "needs the run's dataset (or pass --no-quality)"
                )
            if (data_cfg.get("image_size", size), data_cfg.get("channels", channels)) != (size, channels):
                raise JobError(
                    f"MLflow run {s.run_id!r}: the checkpoint's U-Net makes {size}x{size}x{channels} images but the "
                    f"run's data is {data_cfg.get('image_size')}x{data_cfg.get('image_size')}x{data_cfg.get('channels')}"
                )
        del model, state  # built to validate the checkpoint; the actors build their own

        import ray

        from pipeline.cluster import connect
        from pipeline.sample.pool import PoolError, SamplingPool, make_batches

        ray_started = not ray.is_initialized()
        try:
            ray_info = connect(s.cluster.address, log=log)
        except Exception as e:
            raise JobError(f"cannot connect to Ray (cluster.address={s.cluster.address!r}): {e}") from None
        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = s.cluster.use_gpu == "yes" or (s.cluster.use_gpu == "auto" and gpus >= 1)
        if use_gpu and gpus < 1:
            raise JobError("cluster.use_gpu=yes but the Ray cluster has no GPUs")
        workers = s.workers or s.cluster.num_workers
        if use_gpu and workers > gpus:
            # One GPU per actor: the extra actors would never be scheduled.
            log(f"note: {workers} actors asked for but the cluster has {gpus:g} GPU(s): sampling with {int(gpus)}")
            workers = int(gpus)
        n = s.num_images
        batches = make_batches(s.first_seed, n, s.batch_size)
        log(
            f"sampling {n} images (seeds {s.first_seed}..{s.first_seed + n - 1}) from {artifact} of run {s.run_id}: "
            f"{tag}, {evals} model evaluations per image, {len(batches)} batches of <= {s.batch_size}, "
            f"{workers} {'GPU' if use_gpu else 'CPU'} actor(s), model calls of {s.chunk} images"
        )
        if s.batch_size % s.chunk and s.batch_size < 4 * s.chunk:
            padded = -(-s.batch_size // s.chunk) * s.chunk
            log(
                f"note: --batch-size {s.batch_size} is not a multiple of --chunk {s.chunk}: each batch is computed "
                f"as {padded} images ({padded / s.batch_size:.2f}x the work); choose a multiple"
            )

        images_path = work / "images.npy"
        images = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=(n, size, size, channels))
        bar = None
        if s.progress:
            from tqdm import tqdm

            bar = tqdm(total=n, unit="img", desc="sampling", file=sys.stderr, mininterval=1.0, dynamic_ncols=True)

        def write(batch, imgs: np.ndarray) -> None:
            images[batch.start : batch.start + len(batch)] = imgs
            if bar is not None:
                bar.update(len(batch))

        pool = SamplingPool(
            data,
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
        seeds = np.arange(s.first_seed, s.first_seed + n, dtype=np.int64)

        # -- outputs ---------------------------------------------------------------------------------
        out = work / "eval" / name
        out.mkdir(parents=True, exist_ok=True)
        make_grid(np.asarray(images[: min(s.grid_size, n)])).save(out / "grid.png")
        np.savez_compressed(out / "samples.npz", images=images, seeds=seeds)  # streams from the memmap
        images_per_s = n / stats.sampling_s if stats.sampling_s > 0 else float("nan")
        cost = {
            "images": n,
            "images_per_s": images_per_s,
            "model_evals_per_image": evals,
            "sampling_s": stats.sampling_s,
            "startup_s": stats.startup_s,
            "actor_cpu_s": stats.actor_cpu_s,
            # CPU actors: share of their cores the actors actually got (1.0 = nothing else ran there).
            "actor_cpu_share": None
            if use_gpu
            else stats.actor_cpu_s / max(workers * s.cluster.threads_per_worker * stats.sampling_s, 1e-9),
            "workers": workers,
            "batch_size": s.batch_size,
            "chunk": s.chunk,
            "actor_failures": stats.actor_failures,
            "resubmitted_batches": stats.resubmitted_batches,
            "device": stats.device,
        }
        quality: dict[str, Any] = {}
        if s.quality:
            quality = quality_metrics(images, data_cfg["url"], s.storage, log=log)
        cost["wall_s"] = time.perf_counter() - t_job

        metrics = {k: cost[k] for k in METRIC_COST_KEYS}
        if quality:
            fs = quality["feature_space"]
            for k in (f"fd_{fs}", f"fd_{fs}_floor", f"fd_{fs}_floor_eval_halves", f"{fs}_eval_accuracy"):
                if quality.get(k) is not None:
                    metrics[k] = quality[k]
        metric_keys = {k: f"{EVAL_DIR}/{tag}/{k}" for k in metrics}
        settings_doc = {
            "eval_name": name,
            "run_id": s.run_id,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "checkpoint": {
                "artifact": artifact,
                "images_seen": images_seen,
                "sha256": hashlib.sha256(data).hexdigest(),
                "weights": "ema" if s.ema else "raw",
            },
            "sampler": {**options, "model_evals_per_image": evals, "tag": tag},
            "schedule": schedule.to_dict(),
            "unet": unet,
            "seeds": {"first": s.first_seed, "last": s.first_seed + n - 1, "count": n},
            "image_shape_hwc": [size, size, channels],
            "batch_size": s.batch_size,
            "chunk": s.chunk,
            "workers": workers,
            "use_gpu": use_gpu,
            "threads_per_worker": s.cluster.threads_per_worker,
            "ray": {"address": ray_info.get("address")},
            "data": data_cfg,
            "settings": s.to_public_dict(),
        }
        metrics_doc = {
            "eval_name": name,
            "metric_step": images_seen,
            "mlflow_metrics": {metric_keys[k]: v for k, v in metrics.items()},
            "cost": cost,
            "quality": quality,
            "per_actor": stats.per_actor,
        }
        (out / "settings.json").write_text(json.dumps(settings_doc, indent=2, default=str) + "\n")
        (out / "metrics.json").write_text(json.dumps(metrics_doc, indent=2, default=str) + "\n")

        from mlflow.entities import Metric

        artifact_dir = f"{EVAL_DIR}/{name}"
        try:
            client.log_artifacts(s.run_id, str(out), artifact_dir)
            ts = int(time.time() * 1000)
            client.log_batch(
                s.run_id, metrics=[Metric(metric_keys[k], float(v), ts, images_seen) for k, v in metrics.items()]
            )
        except Exception as e:
            raise JobError(f"could not log the results to MLflow run {s.run_id!r}: {e}") from None
        summary = {
            "run_id": s.run_id,
            "eval_name": name,
            "artifacts": {
                k: f"{artifact_dir}/{k}" for k in ("grid.png", "samples.npz", "settings.json", "metrics.json")
            },
            "metrics": {metric_keys[k]: v for k, v in metrics.items()},
            "metric_step": images_seen,
            "cost": cost,
            "checkpoint": artifact,
            "local_dir": None if tmp_owner else str(out),
        }
        return summary
    finally:
        if ray_started:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        if tmp_owner:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None, *, after_batch: Callable | None = None) -> int:
    from pipeline.data.errors import DataError

    try:
        s = SampleSettings.from_cli(argv, prog="sample.py")
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if s.dry_run:
        print(s.dump())
        return 0
    try:
        summary = run(s, after_batch=after_batch)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    except (JobError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
