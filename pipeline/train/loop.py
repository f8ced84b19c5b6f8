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

    t, rank, world = settings.train, dist.rank(), dist.world_size()
    device = use_device(settings)
    state = TrainState(
        settings.unet_config(),
        settings.diffusion.build(),
        optim_config(settings),
        device=device,
        seed=t.seed,
        rank=rank,
    )
    reader = ShardReader(
        settings.data,
        settings.storage,
        split="train",
        rank=rank,
        world_size=world,
        batch_size=t.batch_size,
        seed=t.seed,
        device=device.type,
    )
    tracking = bool(settings.tracking.uri and mlflow_run_id)
    tracker = _tracker(settings.tracking.uri, mlflow_run_id) if tracking and rank == 0 else None
    if tracker:
        tracker.start_system_metrics()
    checkpoints = Checkpointer(state, reader, session, tracker)
    metrics = MetricLogger(tracker, tracking=tracking, num_timesteps=state.schedule.num_timesteps)
    grids = GridLogger(state, settings, tracker)
    guard = NanGuard(t.max_bad_steps, device)
    validator = Validator(state, settings)

    restored = checkpoints.restore()
    resumed = restored is not None
    if not resumed:
        log_run_start(tracker, settings, reader, world)
    log_world_size(tracker, world, state.images_seen, checkpoints.saved_world, restored)
    where = f"resumed at {state.images_seen} images" if resumed else "starting"
    share = f"partitions {reader.owned.start}-{reader.owned.stop - 1} of {reader.partitions}"
    _say(rank, f"{where}; world_size={world}, rank 0 reads {share}, device {device}")
    shape = dict(
        world_size=world,
        partitions=reader.partitions,
        max_workers=settings.cluster.max_workers,
        grad_accum=t.grad_accum,
    )

    timer = StepTimer()
    progress = Progress(t.total_images, t.progress_every_s, state.images_seen) if rank == 0 else None
    batches = reader.stream()
    while state.images_seen < t.total_images:
        batch = next(batches)
        r = state.train_step(**step_inputs(state, batch, **shape))
        images, skipped = dist.all_reduce_host([r.images, batch.skipped])
        before = state.images_seen
        state.images_seen += images
        state.samples_skipped += skipped
        timer.stepped(images, state.images_seen)
        guard.observe(r.finite)

        done = state.images_seen >= t.total_images
        log_now = done or state.step_count % t.log_every_steps == 0
        save_now = done or reached(t.checkpoint_every_images, before, state.images_seen)
        grid_now = done or reached(t.sample_every_images, before, state.images_seen)
        if (log_now or save_now or grid_now) and (bad := guard.tripped()):
            _say(rank, f"{bad} non-finite steps in a row: rolling back to the last checkpoint")
            batches.close()  # stops this stream's DataLoader workers before the rewound one starts
            if checkpoints.restore() is None:
                raise NotRetryable(  # a restart would start from the same weights and diverge again
                    f"training diverged ({bad} non-finite steps in a row at {state.images_seen} images) "
                    "and there is no checkpoint to roll back to; lower --train.lr or raise --train.warmup-images"
                )
            guard.reset()
            batches = reader.stream()
            continue
        if log_now:
            with timer.side("tracking"):
                metrics.log(state, r, images, batch.epoch, timer.window_images_per_s())
        if validator.every and (done or validator.due(before, state.images_seen)):
            with timer.side("validate"):
                val = {"val_loss": validator.loss(), "images_seen": state.images_seen}
                if tracker:
                    tracker.log_metrics({"val/loss": val["val_loss"]}, step=state.images_seen)
                session.report(val, None, "")  # what a sweep's scheduler stops trials on
        if save_now:
            with timer.side("checkpoint"):
                last_val = {} if validator.last is None else {"val_loss": validator.last}
                checkpoints.save(timer.summary(state.images_seen) | last_val)
                log_world_size(tracker, world, state.images_seen, None, None)
            if progress:
                progress.checkpointed(state.images_seen)
        if grid_now:
            with timer.side("grid"):
                grids.log()
        if progress and (done or progress.due()):
            progress.report(state.images_seen, float(r.per_sample.mean()))  # rank 0's loss: no collective

    if tracker:
        tracker.log_metrics(timer.overheads(), step=state.images_seen)
        tracker.set_tags({NOTE_TAG: run_description(settings, reader, world, metrics.last_loss)})
        tracker.close(status="FINISHED")
    return {"images_seen": state.images_seen, "steps": state.step_count} | timer.summary(state.images_seen)


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


def _tracker(uri: str, run_id: str):

    return Tracker(uri, run_id)


def _say(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[train] {message}", flush=True)
