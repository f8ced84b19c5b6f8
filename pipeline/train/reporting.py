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
from pipeline.data.manifest import open_manifest
from pipeline.ddpm.sampler import sample, to_uint8
from pipeline.grid import grid_png
from pipeline.tracking import NOTE_TAG
from pipeline.train import dist
from pipeline.train.hosts import rank_hosts
from pipeline.train.state import StepResult, TrainState

QUARTILE_NAMES = ("q1", "q2", "q3", "q4")


def log_run_start(tracker, settings: Settings, reader, world: int) -> None:
    """A new run's settings (params and config.json), noise schedule (figure and values), provenance, and
    what the run page shows: source tags, the training and evaluation data as dataset inputs, a description."""
    if tracker is None:
        return
    schedule = settings.diffusion.build()
    used = {
        "world_size": world,
        "per_rank_batch": reader.batch_size // world,
        "loader_workers_used": reader.loader_workers,
    }
    tracker.log_settings(settings, used)
    tracker.log_bytes(schedule_figure(schedule), "schedule.png", "schedule")
    tracker.log_bytes(json.dumps(schedule.to_dict() | schedule.curves()).encode(), "schedule.json", "schedule")
    prov = provenance(settings, reader, world)
    tracker.log_bytes(json.dumps(prov, indent=2).encode(), "provenance.json")
    tags = {"mlflow.source.name": "jobs/train.py", "mlflow.source.type": "JOB"}
    tags |= {"mlflow.source.git.commit": prov["git_commit"]} if prov["git_commit"] else {}
    tracker.set_tags(tags | {NOTE_TAG: run_description(settings, reader, world)})
    tracker.log_datasets(datasets(settings, reader))


def datasets(settings: Settings, reader) -> list[tuple[str, str, str, str]]:
    """(name, URL, digest, context) of the training split and, when the data has one, the evaluation split."""

    out = [(f"{settings.data.url}/train", reader.manifest.base_url, reader.manifest.digest, "training")]
    try:
        m = open_manifest(settings.data.url, settings.storage, "eval")
        out.append((f"{settings.data.url}/eval", m.base_url, m.digest, "evaluation"))
    except Exception:  # no evaluation split: the run page lists the training data only
        pass
    return out


def run_description(settings: Settings, reader, world: int, final_loss: float | None = None) -> str:
    """The run page's description: what was trained on what, where the grids are, the final loss when done."""
    d, t, m = settings.data, settings.train, reader.manifest
    text = (
        f"DDPM, `{settings.model.preset}` U-Net, {settings.diffusion.num_timesteps}-step "
        f"{settings.diffusion.schedule} schedule, {settings.diffusion.objective} objective; trained on "
        f"{d.url} ({m.num_samples:,} images, {d.image_size}x{d.image_size}x{d.channels}) for "
        f"{t.total_images:,} images on {world} worker(s), batch {t.batch_size}, lr {t.lr:g}.\n\n"
        "Sample grids: artifacts `samples/`; sampling checkpoints: `checkpoints/` (`jobs/sample.py --run-id`)."
    )
    return text + (f"\n\nFinal training loss: {final_loss:.4f}." if final_loss is not None else "")


class MetricLogger:
    """The metrics of a log step, when the run is tracked: every rank joins the sum of the losses, rank 0
    (the one with the tracker) sends them. Reading the step's results waits for the device."""

    def __init__(self, tracker, *, tracking: bool, num_timesteps: int) -> None:
        self.tracker, self.tracking, self.num_timesteps = tracker, tracking, num_timesteps
        self.last_loss: float | None = None  # the loss of the last log step (rank 0)

    def log(self, state: TrainState, r: StepResult, images: int, epoch: int, images_per_s: float) -> None:
        if not self.tracking:
            return
        loss_sum = dist.all_reduce_sum(r.per_sample.sum().double().reshape(1))
        if self.tracker is None:
            return
        self.last_loss = float(loss_sum) / max(images, 1)
        metrics = {
            "train/loss": self.last_loss,
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
    step images/s also leaves out the side work timed with ``side()`` (checkpoints, grids, tracking,
    validation).
    The clock is the host's: on a GPU it is exact at the points where the host waits for the device
    (log steps, checkpoints), which is where the figures are read.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.side_s = {"tracking": 0.0, "checkpoint": 0.0, "grid": 0.0, "validate": 0.0}
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


class Progress:
    """The operator's view of a run: one line every ``every_s`` seconds of wall clock (and a last one
    when training ends) with images seen of the total, loss, images/s, ETA and the last checkpoint.

    The loop asks ``due()`` after each step, a clock read; only when it is due does it read the step's
    loss from the device, so a line costs one device wait per interval. Lines end in a newline and
    never a carriage return: ``ray job logs`` and captured output show them as they are.
    """

    def __init__(self, total: int, every_s: float, images_seen: int = 0, *, clock=time.monotonic, out=print) -> None:
        self.total, self.every_s, self.clock, self.out = total, every_s, clock, out
        now = clock()
        self.start = (now, images_seen)  # the average since here gives the ETA
        self.last = (now, images_seen)  # the previous line: images/s over the interval
        self.checkpoint: tuple[int, float] | None = None  # images seen at the last checkpoint, its clock

    def due(self) -> bool:
        return self.clock() - self.last[0] >= self.every_s

    def checkpointed(self, images_seen: int) -> None:
        self.checkpoint = (images_seen, self.clock())

    def report(self, images_seen: int, loss: float) -> str:
        """Print (and return) the line for now; the next one is due ``every_s`` later."""
        line = self.line(images_seen, loss)
        self.last = (self.clock(), images_seen)
        self.out(line, flush=True)
        return line

    def line(self, images_seen: int, loss: float) -> str:
        now = self.clock()
        (t0, n0), (t1, n1) = self.start, self.last
        rate = (images_seen - n1) / max(now - t1, 1e-9)
        average = (images_seen - n0) / max(now - t0, 1e-9)
        left = max(self.total - images_seen, 0)
        eta = "done" if not left else f"ETA {duration(left / average)}" if average > 0 else "ETA ?"
        ckpt = "none yet"
        if self.checkpoint:
            ckpt = f"{self.checkpoint[0]:,} images, {duration(now - self.checkpoint[1])} ago"
        return (
            f"[train] {images_seen:,}/{self.total:,} images ({100 * images_seen / self.total:.1f}%) | "
            f"loss {loss:.4f} | {rate:,.0f} images/s | {eta} | last checkpoint {ckpt}"
        )


def duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


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
        "rank_hosts": rank_hosts(),
        "seed": settings.train.seed,
        "grid_seeds": [0, settings.train.grid_size - 1],
    }
