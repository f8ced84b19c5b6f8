"""An evaluation's plan, settled before any image is made: which checkpoint (read and rebuilt here, so
a bad one fails before Ray starts), which sampler, which seeds in which batches, and on which devices.

Everything about the model comes from the MLflow run (``pipeline.tracking.TrackedRun``): the
checkpoint artifact ``checkpoints/images_<N>.pt`` (weights, EMA, U-Net and schedule config,
objective) and the run's ``data.url`` param (the real images for the quality metric).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import cluster
from pipeline.checkpoint import load_sampling_export, model_for_sampling
from pipeline.config import ConfigError
from pipeline.ddpm.sampler import SamplerOptions
from pipeline.ddpm.schedule import NoiseSchedule
from pipeline.errors import JobError
from pipeline.sample.pool import SeedBatch, make_batches
from pipeline.sample.settings import SampleSettings, checkpoint_images
from pipeline.tracking import CHECKPOINT_DIR, TrackedRun


class EvaluationError(JobError):
    """The run, its checkpoint, its data or the cluster cannot be used for this evaluation."""


class SizeMismatch(EvaluationError):
    """The checkpoint makes images of another size than ``--image-size`` asks for."""


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


@dataclass(frozen=True)
class Plan:
    run_id: str
    checkpoint: Checkpoint
    options: SamplerOptions
    model_evals: int  # per image
    tag: str  # the sampler's short name: one MLflow curve per tag
    name: str  # the evaluation's folder eval/<name>/
    data: dict[str, Any]  # the run's data.url / image_size / channels
    batches: list[SeedBatch]


@dataclass(frozen=True)
class Devices:
    workers: int
    use_gpu: bool


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


def make_plan(s: SampleSettings, run: TrackedRun, work: Path) -> Plan:
    """Read and check the checkpoint and the run's data; ``work``: where downloads go."""
    artifact = choose_checkpoint(run.checkpoints(), s.checkpoint, s.run_id)
    ckpt = load_checkpoint(run, artifact, work, s.ema)
    size, _, channels = ckpt.shape_hwc
    if s.image_size is not None and size != s.image_size:
        raise SizeMismatch(
            f"{s.model or f'MLflow run {s.run_id!r}'} ({artifact}) makes {size}x{size}x{channels} images, "
            f"not {s.image_size}x{s.image_size} as asked (--image-size)"
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
    data = run_data_config(run, work)
    if s.quality:
        check_data_for_quality(data, ckpt, s.run_id)
    return Plan(
        run_id=s.run_id,
        checkpoint=ckpt,
        options=options,
        model_evals=evals,
        tag=tag,
        name=s.name or f"{tag}-{ckpt.name}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}",
        data=data,
        batches=make_batches(s.first_seed, s.num_images, s.batch_size),
    )


def choose_checkpoint(checkpoints: dict[int, str], spec: str, run_id: str) -> str:
    """The artifact path of checkpoint ``spec`` ('latest', images_<N> or N) among the run's ``checkpoints``."""
    if not checkpoints:
        raise EvaluationError(
            f"MLflow run {run_id!r} has no sampling checkpoint: no artifact {CHECKPOINT_DIR}/images_<N>.pt "
            "(was it logged by the training job? has it reached its first checkpoint?)"
        )
    if spec == "latest":
        return checkpoints[max(checkpoints)]
    n = checkpoint_images(spec)
    if n not in checkpoints:
        have = ", ".join(Path(p).name for _, p in sorted(checkpoints.items()))
        raise EvaluationError(
            f"MLflow run {run_id!r} has no checkpoint {CHECKPOINT_DIR}/images_{n:012d}.pt; it has: {have}"
        )
    return checkpoints[n]


def load_checkpoint(run: TrackedRun, artifact: str, work: Path, ema: bool) -> Checkpoint:
    """Download ``artifact`` and rebuild schedule and model here, so a bad checkpoint fails before Ray starts."""
    data = run.download(artifact, work).read_bytes()
    where = f"{artifact!r} of MLflow run {run.run_id!r}"
    try:
        state = load_sampling_export(data)
    except Exception as e:
        raise EvaluationError(f"artifact {where} is not a sampling checkpoint this code can read: {e}") from None
    try:
        schedule = NoiseSchedule.from_dict(state["schedule"])
    except Exception as e:
        raise EvaluationError(f"cannot rebuild the noise schedule from {where}: {e}") from None
    if state["objective"] not in ("eps", "x0", "v"):
        raise EvaluationError(f"{where}: unknown objective {state['objective']!r}")
    try:
        model_for_sampling(state, ema=ema)
    except Exception as e:
        raise EvaluationError(
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
        raise EvaluationError(
            f"MLflow run {run_id!r} has no data.url param or config.json artifact: the quality metric "
            "needs the run's dataset (or pass --no-quality)"
        )
    size, _, channels = ckpt.shape_hwc
    if (data.get("image_size", size), data.get("channels", channels)) != (size, channels):
        raise EvaluationError(
            f"MLflow run {run_id!r}: the checkpoint's U-Net makes {size}x{size}x{channels} images but the "
            f"run's data is {data.get('image_size')}x{data.get('image_size')}x{data.get('channels')}"
        )


def place(s: SampleSettings, log) -> Devices:
    """Sampling actors for the connected Ray cluster: one GPU each where it has GPUs (``cluster.use_gpu``,
    the rule training follows too), else ``cluster.threads_per_worker`` CPUs each, as many as fit."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    asked = s.workers or s.cluster.max_workers
    if s.cluster.use_gpu == "yes" and gpus < 1:
        raise EvaluationError("cluster.use_gpu=yes but the Ray cluster has no GPUs; use --cluster.use-gpu auto or no")
    try:
        use_gpu, workers = cluster.choose_device(s.cluster.use_gpu, gpus, asked, fewer_ok=True)
    except cluster.DeviceError as e:
        raise EvaluationError(str(e)) from None
    if use_gpu and workers < asked:
        log(f"note: {asked} actors asked for but the cluster has {gpus:g} GPU(s): sampling with {workers}")
    if not use_gpu:
        # The pool waits for every actor it asks for; one no node can hold would hold up the whole job.
        threads = s.cluster.threads_per_worker
        fits = sum(int(nd["Resources"].get("CPU", 0) // threads) for nd in ray.nodes() if nd.get("Alive"))
        if fits == 0:
            raise EvaluationError(
                f"no node of the Ray cluster has {threads} CPUs for one sampling actor "
                f"(cluster.threads_per_worker={threads})"
            )
        if workers > fits:
            log(f"note: {workers} actors of {threads} CPU(s) asked for but the cluster's nodes hold {fits}")
            workers = fits
    return Devices(workers, use_gpu)
