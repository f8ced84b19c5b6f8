"""What a training worker reports besides checkpoints: the run's configuration when it starts, metrics
at log steps, sample grids, and where its time went (for the overhead metrics and the benchmarks)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from pathlib import Path

import torch

from pipeline.checkpoint import checkpoint_name
from pipeline.config import Settings
from pipeline.ddpm.sampler import sample, to_uint8
from pipeline.grid import grid_png
from pipeline.train import dist
from pipeline.train.state import StepResult, TrainState

QUARTILE_NAMES = ("q1", "q2", "q3", "q4")


def log_run_start(tracker, settings: Settings, reader, world: int) -> None:
    """A new run's settings (params and config.json), noise schedule (figure and values) and provenance."""
    if tracker is None:
        return
    schedule = settings.diffusion.build()
    used = {"world_size": world, "per_rank_batch": reader.batch_size, "loader_workers_used": reader.loader_workers}
    tracker.log_settings(settings, used)
    tracker.log_bytes(schedule_figure(schedule), "schedule.png", "schedule")
    tracker.log_bytes(json.dumps(schedule.to_dict() | schedule.curves()).encode(), "schedule.json", "schedule")
    tracker.log_bytes(json.dumps(provenance(settings, reader, world), indent=2).encode(), "provenance.json")


class MetricLogger:
    """The metrics of a log step, when the run is tracked: every rank joins the sum of the losses, rank 0
    (the one with the tracker) sends them. Reading the step's results waits for the device."""

    def __init__(self, tracker, *, tracking: bool, num_timesteps: int) -> None:
        self.tracker, self.tracking, self.num_timesteps = tracker, tracking, num_timesteps

    def log(self, state: TrainState, r: StepResult, images: int, epoch: int, images_per_s: float) -> None:
        if not self.tracking:
            return
        loss_sum = dist.all_reduce_sum(r.per_sample.sum().double().reshape(1))
        if self.tracker is None:
            return
        metrics = {
            "train/loss": float(loss_sum) / max(images, 1),
            "train/lr": r.lr,
            "train/grad_norm": r.grad_norm if r.applied else -1.0,
            "train/images_per_s": images_per_s,
            "train/images_seen": state.images_seen,
            "train/samples_skipped": state.samples_skipped,
            "train/steps_skipped": int(state.skipped_steps),
            "train/epoch": epoch,
        }
        metrics |= loss_by_quartile(r.per_sample.cpu(), r.t.cpu(), self.num_timesteps)
        self.tracker.log_metrics(metrics, step=state.images_seen)


def loss_by_quartile(per_sample: torch.Tensor, t: torch.Tensor, num_timesteps: int) -> dict[str, float]:
    """Mean loss per quarter of the timestep range (q1: least noise ... q4: most noise)."""
    out = {}
    bucket = (t * 4) // num_timesteps
    for q, name in enumerate(QUARTILE_NAMES):
        m = bucket == q
        if m.any():
            out[f"train/loss_{name}"] = float(per_sample[m].mean())
    return out


class GridLogger:
    """Sample grids from the EMA model at fixed seeds 0..grid_size-1, so grids are comparable over time.
    Rank 0 draws them when it has a tracker (the grids' only destination); the other ranks wait."""

    def __init__(self, state: TrainState, settings: Settings, tracker) -> None:
        self.state, self.tracker = state, tracker
        d = settings.data
        self.shape = (d.channels, d.image_size, d.image_size)
        self.seeds = range(settings.train.grid_size)
        self.options = settings.sample.options(settings.diffusion.objective)

    def log(self) -> None:
        if self.tracker:
            s = self.state
            imgs = sample(s.ema.model, s.schedule, self.seeds, self.shape, self.options, device=s.device)
            self.tracker.log_bytes(grid_png(to_uint8(imgs)), f"grid_{checkpoint_name(s.images_seen)}.png", "samples")
        dist.barrier()


class StepTimer:
    """Where a worker's time goes, in one place for the metrics and the benchmarks.

    Steady images/s counts from the end of the first step (start-up and first-step costs left out);
    step images/s also leaves out the side work timed with ``side()`` (checkpoints, grids, tracking).
    The clock is the host's: on a GPU it is exact at the points where the host waits for the device
    (log steps, checkpoints), which is where the figures are read.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.side_s = {"tracking": 0.0, "checkpoint": 0.0, "grid": 0.0}
        self.saves = 0  # checkpoints timed in side_s["checkpoint"]
        self.first: tuple[float, int, float] | None = None  # end of the first step: clock, images seen, unix time
        self.images = 0  # images trained on, over all ranks (a rollback's repeated steps count again)
        self._window = (self.start, 0)

    def stepped(self, images: int, images_seen: int) -> None:
        self.images += images
        if self.first is None:
            self.first = (time.perf_counter(), images_seen, time.time())

    @contextlib.contextmanager
    def side(self, kind: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.side_s[kind] += time.perf_counter() - t0
            self.saves += kind == "checkpoint"

    def window_images_per_s(self) -> float:
        """Images/s since the previous call (the first: since the start)."""
        now = time.perf_counter()
        (t0, n0), self._window = self._window, (now, self.images)
        return (self.images - n0) / max(now - t0, 1e-9)

    def summary(self, images_seen: int) -> dict:
        """The figures the benchmarks read (reported with every checkpoint); {} before the first step."""
        if self.first is None:
            return {}
        now = time.perf_counter()
        t_first, images_first, unix_first = self.first
        trained, elapsed = images_seen - images_first, now - t_first
        return {
            "steady_images_per_s": trained / max(elapsed, 1e-9),
            "step_images_per_s": trained / max(elapsed - sum(self.side_s.values()), 1e-9),
            "loop_s": now - self.start,
            "first_step_unix": unix_first,
            "checkpoints_timed": self.saves,
        } | {f"{k}_s": v for k, v in self.side_s.items()}

    def overheads(self) -> dict[str, float]:
        wall = time.perf_counter() - self.start
        return {f"train/overhead_{k}_frac": self.side_s[k] / max(wall, 1e-9) for k in ("tracking", "checkpoint")}


def schedule_figure(schedule) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = schedule.curves()
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.2))
    for a, (key, title) in zip(
        ax, [("beta", "beta_t"), ("alpha_bar", "alpha-bar_t"), ("log_snr", "log SNR_t")], strict=False
    ):
        a.plot(range(1, len(c[key]) + 1), c[key])
        a.set_title(title)
        a.set_xlabel("t")
    fig.suptitle(f"noise schedule: {schedule.to_dict()}", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def provenance(settings: Settings, reader, world: int) -> dict:
    import platform
    import subprocess
    from importlib import metadata

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    versions = {}
    for pkg in ("torch", "ray", "mlflow", "webdataset", "pydantic-settings", "boto3", "ddpm-pipeline"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    return {
        "git_commit": commit or os.environ.get("DDPM_GIT_COMMIT"),
        "packages": versions,
        "python": platform.python_version(),
        "dataset_manifest_sha256": reader.layout()["manifest"],
        "dataset_url": settings.data.url,
        "dataset_samples": reader.num_samples,
        "world_size": world,
        "seed": settings.train.seed,
        "grid_seeds": [0, settings.train.grid_size - 1],
    }
