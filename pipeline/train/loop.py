"""The training loop of one worker: restore, loop, step, checkpoint, evaluate.

It runs under Ray Train (``jobs/train.py``) or plain torch.distributed (the benchmark); what differs
is passed in as a ``Session``: how to report a checkpoint and where earlier checkpoints are. The
model code knows nothing of either; DDP is applied in ``parallelize``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.checkpoint import (
    CorruptCheckpoint,
    checkpoint_name,
    read_checkpoint,
    sampling_export,
    to_cpu,
    write_checkpoint,
)
from pipeline.config import Settings
from pipeline.ddpm.sampler import sample, to_uint8
from pipeline.grid import grid_png
from pipeline.train import dist
from pipeline.train.state import OptimConfig, TrainState

QUARTILE_NAMES = ("q1", "q2", "q3", "q4")


@dataclass
class Session:
    """What the loop needs from its runner.

    report(metrics, checkpoint_dir, name): every rank calls it at each checkpoint; only rank 0 passes
    a directory. candidates(): checkpoint directories to restore from, newest first (each is read
    and verified; a corrupt one is skipped). ``fetch`` turns a candidate into a local directory.
    """

    report: Callable[[dict, Path | None, str], None]
    candidates: Callable[[], list] = field(default=lambda: [])
    fetch: Callable[[object], Path] = field(default=lambda c: Path(c))


def optim_config(s: Settings) -> OptimConfig:
    t = s.train
    return OptimConfig(
        lr=t.lr,
        weight_decay=t.weight_decay,
        warmup_images=t.warmup_images,
        grad_clip=t.grad_clip,
        ema_decay=t.ema_decay,
        ema_warmup=t.ema_warmup,
        objective=s.diffusion.objective,
        precision=t.precision,
        channels_last=t.channels_last,
        compile=t.compile,
        compile_mode=t.compile_mode,
        fused_adamw=t.fused_adamw,
    )


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


def _device(settings: Settings) -> torch.device:
    if torch.cuda.is_available() and settings.cluster.use_gpu != "no":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def train_worker(settings: Settings, session: Session, mlflow_run_id: str | None = None) -> dict:
    """One worker's whole run. Returns a summary (on every rank)."""
    from pipeline.data.reader import ShardReader

    rank, world = dist.rank(), dist.world_size()
    device = _device(settings)
    if device.type == "cpu":
        torch.set_num_threads(settings.cluster.threads_per_worker)
    else:
        torch.cuda.set_device(device)  # NCCL's object collectives use the current device
    t = settings.train
    schedule = settings.diffusion.build()
    state = TrainState(settings.unet_config(), schedule, optim_config(settings), device=device, seed=t.seed, rank=rank)
    per_rank_batch = t.batch_size // world
    reader = ShardReader(
        settings.data.model_copy(update={"loader_workers": settings.data.workers_for(device.type)}),
        settings.storage,
        split="train",
        rank=rank,
        world_size=world,
        batch_size=per_rank_batch,
        seed=t.seed,
    )
    tracker = None
    if rank == 0 and settings.tracking.uri and mlflow_run_id:
        from pipeline.tracking import Tracker

        tracker = Tracker(settings.tracking.uri, mlflow_run_id)

    # -- restore ---------------------------------------------------------------------------------------
    extra = restore(state, reader, session, rank, world)
    resumed = state.images_seen > 0
    if tracker and not resumed:
        used = {"world_size": world, "per_rank_batch": per_rank_batch, "loader_workers_used": reader.loader_workers}
        tracker.log_params(settings.flat_params() | used)
        tracker.log_bytes(settings.dump().encode(), "config.json")
        tracker.log_bytes(schedule_figure(schedule), "schedule.png", "schedule")
        tracker.log_bytes(json.dumps(schedule.to_dict() | schedule.curves()).encode(), "schedule.json", "schedule")
        tracker.log_bytes(json.dumps(provenance(settings, reader, world), indent=2).encode(), "provenance.json")
    if rank == 0:
        where = f"resumed at {state.images_seen} images" if resumed else "starting"
        print(f"[train] {where}; world_size={world}, per-rank batch {per_rank_batch}, device {device}", flush=True)

    # -- loop ------------------------------------------------------------------------------------------
    every_ckpt, every_grid = t.checkpoint_every_images, t.sample_every_images
    next_ckpt, next_grid = next_multiple(state.images_seen, every_ckpt), next_multiple(state.images_seen, every_grid)
    bad_in_row, samples_skipped = 0, int(extra.get("samples_skipped", 0))
    timing = {"wall": 0.0, "tracking": 0.0, "checkpoint": 0.0, "grid": 0.0}
    saves = 0
    window_images, window_start = 0, time.perf_counter()
    loop_start = time.perf_counter()
    first_step_end, images_at_first, first_step_unix = None, state.images_seen, None
    last_saved = state.images_seen if resumed else -1
    batches: Iterator = reader.stream()
    while state.images_seen < t.total_images:
        batch = next(batches)
        micro = list(torch.tensor_split(batch.images, t.grad_accum)) if t.grad_accum > 1 else [batch.images]
        r = state.train_step([m for m in micro if len(m)])
        # One all-reduce per step: loss sum, images, skipped samples.
        totals = dist.all_reduce_sum(torch.tensor([r.loss_sum, r.images, batch.skipped], dtype=torch.float64))
        loss_sum, images, skipped = totals.tolist()
        state.images_seen += int(images)
        if first_step_end is None:
            first_step_end, images_at_first = time.perf_counter(), state.images_seen
            first_step_unix = time.time()
        samples_skipped += int(skipped)
        window_images += int(images)
        bad_in_row = 0 if r.applied else bad_in_row + 1
        if bad_in_row >= t.max_bad_steps:
            if rank == 0:
                print(
                    f"[train] {bad_in_row} non-finite steps in a row: rolling back to the last checkpoint", flush=True
                )
            batches.close()  # stops this stream's DataLoader workers before the rewound one starts
            back = restore(state, reader, session, rank, world)
            if not back:
                raise RuntimeError(
                    f"training diverged ({bad_in_row} non-finite steps in a row at {state.images_seen} images) "
                    "and there is no checkpoint to roll back to; lower --train.lr or raise --train.warmup-images"
                )
            samples_skipped = int(back.get("samples_skipped", 0))
            batches, bad_in_row = reader.stream(), 0
            next_ckpt, next_grid = (
                next_multiple(state.images_seen, every_ckpt),
                next_multiple(state.images_seen, every_grid),
            )
            continue

        done = state.images_seen >= t.total_images
        if tracker and (state.step_count % t.log_every_steps == 0 or done):
            t0 = now = time.perf_counter()
            metrics = {
                "train/loss": loss_sum / max(images, 1),
                "train/lr": r.lr,
                "train/grad_norm": r.grad_norm if math.isfinite(r.grad_norm) else -1.0,
                "train/images_per_s": window_images / max(now - window_start, 1e-9),
                "train/images_seen": state.images_seen,
                "train/samples_skipped": samples_skipped,
                "train/steps_skipped": state.skipped_steps,
                "train/epoch": batch.epoch,
            }
            metrics |= loss_by_quartile(r.per_sample, r.t, schedule.num_timesteps)
            tracker.log_metrics(metrics, step=state.images_seen)
            window_images, window_start = 0, now
            timing["tracking"] += time.perf_counter() - t0

        if state.images_seen >= next_ckpt or done:
            t0 = time.perf_counter()
            elapsed = time.perf_counter() - first_step_end
            side = timing["checkpoint"] + timing["grid"] + timing["tracking"]
            summary = {
                "steady_images_per_s": (state.images_seen - images_at_first) / max(elapsed, 1e-9),
                # The training steps alone (checkpoints, grids and logging taken out), for comparing runners.
                "step_images_per_s": (state.images_seen - images_at_first) / max(elapsed - side, 1e-9),
                "loop_s": time.perf_counter() - loop_start,
                "first_step_unix": first_step_unix,
            } | {f"{k}_s": v for k, v in timing.items() if k != "wall"}
            summary["checkpoints_timed"] = saves  # the saves inside checkpoint_s (not this one)
            save(state, reader, session, tracker, rank, samples_skipped, summary)
            saves += 1
            last_saved = state.images_seen
            next_ckpt = next_multiple(state.images_seen, every_ckpt)
            timing["checkpoint"] += time.perf_counter() - t0
        if state.images_seen >= next_grid or done:
            t0 = time.perf_counter()
            if tracker:  # rank 0's, when tracking is on: the grid's only destination
                log_grid(state, settings, tracker)
            next_grid = next_multiple(state.images_seen, every_grid)
            timing["grid"] += time.perf_counter() - t0
            dist.barrier()

    if last_saved != state.images_seen:  # e.g. resumed at the very end
        save(state, reader, session, tracker, rank, samples_skipped)
    timing["wall"] = time.perf_counter() - loop_start
    if tracker:
        timing["tracking"] += tracker.time_spent
        tracker.log_metrics(
            {
                "train/overhead_tracking_frac": timing["tracking"] / max(timing["wall"], 1e-9),
                "train/overhead_checkpoint_frac": timing["checkpoint"] / max(timing["wall"], 1e-9),
            },
            step=state.images_seen,
        )
        tracker.close(status="FINISHED")
    return {"images_seen": state.images_seen, "steps": state.step_count, "timing": timing, "rank": rank}


def next_multiple(images: int, every: int) -> float:
    """The first multiple of ``every`` above ``images`` (inf when ``every`` is 0: never)."""
    return (images // every + 1) * every if every else math.inf


def loss_by_quartile(per_sample: torch.Tensor, t: torch.Tensor, num_timesteps: int) -> dict[str, float]:
    """Mean loss per quarter of the timestep range (q1: least noise ... q4: most noise)."""
    out = {}
    bucket = (t * 4) // num_timesteps
    for q, name in enumerate(QUARTILE_NAMES):
        m = bucket == q
        if m.any():
            out[f"train/loss_{name}"] = float(per_sample[m].mean())
    return out


def log_grid(state: TrainState, settings: Settings, tracker) -> None:
    """A grid from the EMA model with fixed seeds 0..grid_size-1, so grids are comparable over time."""
    shape = (settings.data.channels, settings.data.image_size, settings.data.image_size)
    imgs = sample(
        state.ema.model,
        state.schedule,
        range(settings.train.grid_size),
        shape,
        settings.sample.options(settings.diffusion.objective),
        device=state.device,
    )
    tracker.log_bytes(grid_png(to_uint8(imgs)), f"grid_{checkpoint_name(state.images_seen)}.png", "samples")


def save(
    state: TrainState, reader, session: Session, tracker, rank: int, samples_skipped: int, summary: dict | None = None
) -> None:
    """Every rank contributes its random states; rank 0 writes and reports the directory."""
    rng = {"generator": state.generator.get_state(), "torch": torch.get_rng_state()}
    if state.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(state.device)
    all_rng = dist.all_gather_object(rng)
    name = checkpoint_name(state.images_seen)
    metrics = {"images_seen": state.images_seen, "step": state.step_count} | (summary or {})
    if rank != 0:
        session.report(metrics, None, name)
        return
    full = to_cpu(
        state.state_dict()
        | {"reader": reader.state_dict(), "rng_per_rank": all_rng, "samples_skipped": samples_skipped}
    )  # once, for both files
    tmp = Path(tempfile.mkdtemp(prefix="ddpm-ckpt-"))
    try:
        write_checkpoint(full, tmp / name, meta={"images_seen": state.images_seen, "step": state.step_count})
        if tracker:
            tracker.log_bytes(sampling_export(full), f"{name}.pt", "checkpoints")
        session.report(metrics, tmp / name, name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore(state: TrainState, reader, session: Session, rank: int, world: int) -> dict:
    """Load the newest complete checkpoint (all ranks agree on which); {} if there is none."""
    # Read on the CPU: random states must stay CPU ByteTensors; load_state_dict moves weights and
    # optimizer moments to the model's device.
    chosen, full = None, None
    if rank == 0:
        for cand in session.candidates():
            try:
                full, _ = read_checkpoint(session.fetch(cand), map_location="cpu")  # verified as it is read
                chosen = str(cand)
                break
            except (CorruptCheckpoint, OSError, RuntimeError) as e:
                print(f"[train] skipping checkpoint {cand}: {e}", flush=True)
    chosen = dist.broadcast_object(chosen)
    if chosen is None:
        return {}
    if full is None:  # the other ranks read the one rank 0 chose
        full, _ = read_checkpoint(session.fetch(chosen), map_location="cpu")
    state.load_state_dict(full, generator=False)
    rngs = full["rng_per_rank"]
    if len(rngs) == world:
        mine = rngs[rank]
        if not state.set_generator_state(mine["generator"]) and rank == 0:
            print(
                "[train] the checkpoint's noise generator is another device's: reseeded from the counters", flush=True
            )
        torch.set_rng_state(mine["torch"])
        if "cuda" in mine and state.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], state.device)
    try:
        reader.load_state_dict(full["reader"])
    except ValueError as e:  # e.g. a different number of workers: continue with the next epoch
        if rank == 0:
            print(f"[train] {e}", flush=True)
        reader.load_state_dict({"epoch": full["reader"]["epoch"] + 1, "batch": 0})
    if rank == 0:
        print(f"[train] restored {chosen} ({state.images_seen} images seen)", flush=True)
    return {"samples_skipped": full.get("samples_skipped", 0), "path": chosen}


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
