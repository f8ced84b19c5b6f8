"""A training run made in this process, without Ray Train: a model to evaluate, logged as the training job logs one.

The sampling benchmark and the sampling tests need a trained model in MLflow quickly. ``train_locally``
runs the training step (``TrainState.train_step``) on the train split held in memory; ``log_as_training_run``
logs the result through the training job's own ``Tracker`` calls: the run (tag ``ddpm.run_name``), the
resolved settings as params and ``config.json``, and a sampling checkpoint ``checkpoints/images_<N>.pt``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any


def train_locally(
    data_url: str,
    storage: Any,
    *,
    preset: str = "tiny",
    schedule: dict | None = None,
    steps: int | None = None,
    seconds: float | None = None,
    batch_size: int = 64,
    lr: float = 2e-3,
    ema_decay: float = 0.995,
    seed: int = 0,
    threads: int = 2,
    log: Callable[[str], None] = print,
):
    """A ``TrainState`` trained on the train split at ``data_url`` for ``steps`` steps or ``seconds``,
    on ``threads`` torch threads."""
    import numpy as np
    import torch

    from pipeline.data import load_split_arrays
    from pipeline.ddpm.schedule import NoiseSchedule
    from pipeline.ddpm.unet import preset as unet_preset
    from pipeline.train.state import OptimConfig, TrainState

    split = load_split_arrays(data_url, storage, "train")
    x = torch.from_numpy(split.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    state = TrainState(
        unet_preset(preset, image_size=x.shape[-1], in_channels=x.shape[1]),
        NoiseSchedule.from_dict(schedule) if schedule else NoiseSchedule(),
        OptimConfig(lr=lr, warmup_images=min(5000, batch_size * 50), ema_decay=ema_decay),
        seed=seed,
    )
    rng = np.random.default_rng(seed)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    losses = []
    try:
        while not (
            (steps is not None and state.step_count >= steps)
            or (seconds is not None and time.perf_counter() - t0 >= seconds)
        ):
            idx = torch.from_numpy(rng.choice(len(x), batch_size, replace=False))
            r = state.train_step([x[idx]])
            state.images_seen += r.images
            losses.append(r.loss_sum / r.images)
            if state.step_count % 500 == 0:
                log(
                    f"train: step {state.step_count}, loss {np.mean(losses[-500:]):.4f}, {time.perf_counter() - t0:.0f} s"
                )
    finally:
        torch.set_num_threads(threads_before)
    log(f"train: {state.step_count} steps, {state.images_seen} images, {time.perf_counter() - t0:.0f} s")
    return state


def log_as_training_run(
    state,
    *,
    tracking_uri: str,
    data_url: str,
    preset: str,
    experiment: str = "ddpm",
    run_name: str | None = None,
    checkpoint: bool = True,
    register_as: str | None = None,
) -> str:
    """The MLflow run id of a new run for ``state``, logged as the training job logs one (finished);
    with ``register_as``, its model is registered as the training job registers it."""
    from pipeline.checkpoint import sampling_export
    from pipeline.config import Settings
    from pipeline.tracking import Tracker, find_or_create_run

    run_name = run_name or f"local-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    sd = state.schedule.to_dict()
    settings = Settings.model_validate(
        {
            "data": {
                "url": data_url,
                "image_size": state.unet_config.image_size,
                "channels": state.unet_config.in_channels,
            },
            "model": {"preset": preset},
            "diffusion": {
                "schedule": sd["kind"],
                "num_timesteps": sd["num_timesteps"],
                "beta_start": sd["beta_start"],
                "beta_end": sd["beta_end"],
                "cosine_s": sd["cosine_s"],
                "objective": state.cfg.objective,
            },
            "train": {"run_name": run_name, "total_images": max(state.images_seen, 1), "register_as": register_as},
            "tracking": {"uri": tracking_uri, "experiment": experiment},
        }
    )
    run_id = find_or_create_run(tracking_uri, experiment, run_name)
    tracker = Tracker(tracking_uri, run_id)
    tracker.log_settings(settings)
    if checkpoint:
        tracker.log_checkpoint(state.images_seen, sampling_export(state.state_dict()))
    tracker.close(status="FINISHED")
    if register_as:
        from pipeline.registry import register

        register(settings, run_id)
    return run_id
