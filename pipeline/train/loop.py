"""The training loop of one worker: restore, loop, step, checkpoint, evaluate.

It runs under Ray Train (``pipeline.train.launch``) or plain torch.distributed (the benchmark); what
differs is passed in as a ``Session``: how to report a checkpoint and where earlier checkpoints are.
The model code knows nothing of either; DDP is applied in ``parallelize``.

The host does not wait for the device after each step: the step's results stay there, and the host
only sums the image counts it already knows. It reads the device at log steps, checkpoints and grids
(every ``train.log_every_steps`` steps at least), and that is also when the NaN guard is checked.
Rank 0 also reads its loss once per ``train.progress_every_s`` for the operator's progress line.
"""

from __future__ import annotations

import os
from dataclasses import fields

import torch

from pipeline.config import Settings
from pipeline.data.reader import ShardReader
from pipeline.tracking import NOTE_TAG, Tracker
from pipeline.train import dist
from pipeline.train.checkpointer import Checkpointer, Session
from pipeline.train.elastic import log_world_size, step_inputs
from pipeline.train.failures import NotRetryable
from pipeline.train.reporting import GridLogger, MetricLogger, Progress, StepTimer, log_run_start, run_description
from pipeline.train.state import OptimConfig, TrainState
from pipeline.train.validate import Validator


def train_worker(settings: Settings, session: Session, mlflow_run_id: str | None = None) -> dict:
    """One worker's whole run. Returns its step count, images seen and timing summary (on every rank)."""
    w = Worker(settings, session, mlflow_run_id)
    w.start()
    t, state = settings.train, w.state
    shape = dict(
        world_size=w.world,
        partitions=w.reader.partitions,
        max_workers=settings.cluster.max_workers,
        grad_accum=t.grad_accum,
    )
    timer = StepTimer()
    progress = Progress(t.total_images, t.progress_every_s, state.images_seen) if w.rank == 0 else None
    batches = w.reader.stream()
    while state.images_seen < t.total_images:
        batch = next(batches)
        r = state.train_step(**step_inputs(state, batch, **shape))
        images, skipped = dist.all_reduce_host([r.images, batch.skipped])
        before = state.images_seen
        state.images_seen += images
        state.samples_skipped += skipped
        timer.stepped(images, state.images_seen)
        w.guard.observe(r.finite)

        done = state.images_seen >= t.total_images
        log_now = done or state.step_count % t.log_every_steps == 0
        save_now = done or reached(t.checkpoint_every_images, before, state.images_seen)
        grid_now = done or reached(t.sample_every_images, before, state.images_seen)
        if (log_now or save_now or grid_now) and (bad := w.guard.tripped()):
            batches.close()  # stops this stream's DataLoader workers before the rewound one starts
            w.roll_back(bad)
            batches = w.reader.stream()
            continue
        if log_now:
            with timer.side("tracking"):
                w.metrics.log(state, r, images, batch.epoch, timer.window_images_per_s())
        if w.validator.every and (done or w.validator.due(before, state.images_seen)):
            with timer.side("validate"):
                w.validate()
        if save_now:
            with timer.side("checkpoint"):
                w.save(timer.summary(state.images_seen))
            if progress:
                progress.checkpointed(state.images_seen)
        if grid_now:
            with timer.side("grid"):
                w.grids.log()
        if progress and (done or progress.due()):
            progress.report(state.images_seen, float(r.per_sample.mean()))  # rank 0's loss: no collective
    w.finish(timer)
    return {"images_seen": state.images_seen, "steps": state.step_count} | timer.summary(state.images_seen)


class Worker:
    """The parts of one worker's run, built once (as torchtitan's Trainer builds its components), and
    what the loop asks of them besides the step: start, roll back, validate, save, finish."""

    def __init__(self, settings: Settings, session: Session, mlflow_run_id: str | None) -> None:
        t, self.rank, self.world = settings.train, dist.rank(), dist.world_size()
        self.settings, self.session, self.device = settings, session, use_device(settings)
        self.state = TrainState(
            settings.unet_config(),
            settings.diffusion.build(),
            optim_config(settings),
            device=self.device,
            seed=t.seed,
            rank=self.rank,
        )
        self.reader = ShardReader(
            settings.data,
            settings.storage,
            split="train",
            rank=self.rank,
            world_size=self.world,
            batch_size=t.batch_size,
            seed=t.seed,
            device=self.device.type,
        )
        tracking = bool(settings.tracking.uri and mlflow_run_id)
        self.tracker = Tracker(settings.tracking.uri, mlflow_run_id) if tracking and self.rank == 0 else None
        if self.tracker:
            self.tracker.start_system_metrics()
        self.checkpoints = Checkpointer(self.state, self.reader, session, self.tracker)
        self.metrics = MetricLogger(self.tracker, tracking=tracking, num_timesteps=self.state.schedule.num_timesteps)
        self.grids = GridLogger(self.state, settings, self.tracker)
        self.guard = NanGuard(t.max_bad_steps, self.device)
        self.validator = Validator(self.state, settings)

    def start(self) -> None:
        """Restore the newest usable checkpoint, or log the run's start."""
        restored = self.checkpoints.restore()
        if restored is None:
            log_run_start(self.tracker, self.settings, self.reader, self.world)
        state = self.state
        log_world_size(self.tracker, self.world, state.images_seen, self.checkpoints.saved_world, restored)
        where = f"resumed at {state.images_seen} images" if restored is not None else "starting"
        share = f"partitions {self.reader.owned.start}-{self.reader.owned.stop - 1} of {self.reader.partitions}"
        _say(self.rank, f"{where}; world_size={self.world}, rank 0 reads {share}, device {self.device}")

    def roll_back(self, bad: int) -> None:
        _say(self.rank, f"{bad} non-finite steps in a row: rolling back to the last checkpoint")
        if self.checkpoints.restore() is None:
            raise NotRetryable(  # a restart would start from the same weights and diverge again
                f"training diverged ({bad} non-finite steps in a row at {self.state.images_seen} images) "
                "and there is no checkpoint to roll back to; lower --train.lr or raise --train.warmup-images"
            )
        self.guard.reset()

    def validate(self) -> None:
        val = {"val_loss": self.validator.loss(), "images_seen": self.state.images_seen}
        if self.tracker:
            self.tracker.log_metrics({"val/loss": val["val_loss"]}, step=self.state.images_seen)
        self.session.report(val, None, "")  # what a sweep's scheduler stops trials on

    def save(self, summary: dict) -> None:
        last_val = {} if self.validator.last is None else {"val_loss": self.validator.last}
        self.checkpoints.save(summary | last_val)
        log_world_size(self.tracker, self.world, self.state.images_seen, None, None)

    def finish(self, timer: StepTimer) -> None:
        if self.tracker:
            self.tracker.log_metrics(timer.overheads(), step=self.state.images_seen)
            self.tracker.set_tags(
                {NOTE_TAG: run_description(self.settings, self.reader, self.world, self.metrics.last_loss)}
            )
            self.tracker.close(status="FINISHED")


class NanGuard:
    """Trips after ``limit`` non-finite steps in a row (the loop then rolls back to the last checkpoint).

    The count stays on the device; ``tripped()`` reads it, waiting for the device, so the loop asks only
    at log steps, checkpoints and grids: a rollback comes at most ``train.log_every_steps - 1`` steps
    after the limit was reached, and never after a checkpoint was saved past it. Every rank reads the
    same count: DDP averages the gradients, so all ranks see the same norm.
    """

    def __init__(self, limit: int, device: torch.device) -> None:
        self.limit = limit
        self.run = torch.zeros((), dtype=torch.int64, device=device)  # non-finite steps in a row, up to now
        self.worst = torch.zeros_like(self.run)  # the longest such run since the last reset

    def observe(self, finite: torch.Tensor) -> None:
        self.run.add_(1).mul_(~finite)
        torch.maximum(self.worst, self.run, out=self.worst)

    def tripped(self) -> int:
        """The longest run of non-finite steps if it reached the limit, else 0."""
        worst = int(self.worst)
        return worst if worst >= self.limit else 0

    def reset(self) -> None:
        self.run.zero_()
        self.worst.zero_()


def reached(every: int, before: int, after: int) -> bool:
    """Whether going from ``before`` to ``after`` images passed a multiple of ``every`` (0: never)."""
    return bool(every) and after // every > before // every


def optim_config(s: Settings) -> OptimConfig:
    """``OptimConfig`` from the settings: the ``train`` fields it names, and the diffusion objective."""
    names = {f.name for f in fields(OptimConfig)} - {"objective"}
    return OptimConfig(**s.train.model_dump(include=names), objective=s.diffusion.objective)


def use_device(settings: Settings) -> torch.device:
    """This worker's device (its GPU when the workers have GPUs), set up: torch threads on a CPU, the
    current CUDA device on a GPU (NCCL's object collectives use it)."""
    if torch.cuda.is_available() and settings.cluster.use_gpu != "no":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    torch.set_num_threads(settings.cluster.threads_per_worker)
    return torch.device("cpu")


def _say(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[train] {message}", flush=True)
