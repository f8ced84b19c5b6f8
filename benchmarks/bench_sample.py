#!/usr/bin/env python
"""Benchmark of the evaluation sampling job (jobs/sample.py) on one trained model, in one run.

    python benchmarks/bench_sample.py                      # trains a digits model for --train-seconds first
    python benchmarks/bench_sample.py --run-id RUN         # or uses an existing training run
    python benchmarks/bench_sample.py --out bench.json     # figures also as JSON

Measures, on the same checkpoint:
  1. scaling: DDIM-50 with 2 actors vs 1 actor (1 thread each), the same seeds, interleaved
     ``--repeats`` times; images/s from the pool's sampling time (actors already loaded);
  2. DDIM-50 vs 1000-step ancestral (2 actors): images/s ratio and the quality metric of each.

Needs the local stack (``python -m infra.stack up``) or the same environment variables. Also holds
the helpers the tests use to make a real training run: ``prepare_digits``, ``train_state``,
``log_training_run``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pydantic import Field  # noqa: E402

from pipeline.config import ConfigError, JobSettings, StorageConfig, TrackingConfig  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Making a training run for evaluation (also used by tests/test_sample_job.py)


def load_job(name: str):
    """The module of ``jobs/<name>.py``."""
    import importlib

    return importlib.import_module(f"jobs.{name}")


def prepare_digits(url: str, *, eval_fraction: float = 0.2) -> None:
    """The digits dataset at ``url`` through the data layer's job (prepare_data), unless already there."""
    from pipeline.data import ManifestError, open_manifest

    try:
        open_manifest(url, _storage(), "eval")
        open_manifest(url, _storage(), "train")
        return
    except ManifestError:
        pass
    mod = load_job("prepare_data")
    argv = ["--out", url, "--eval-fraction", str(eval_fraction), "--no-progress", "--overwrite"]
    rc = mod.main(argv)
    if rc != 0:
        raise RuntimeError(f"prepare_data {' '.join(argv)} failed with exit code {rc}")


class _StorageSettings(JobSettings):
    storage: StorageConfig = StorageConfig()


def _storage() -> StorageConfig:
    """The storage settings from the environment / the local stack, as the jobs resolve them."""
    return _StorageSettings.from_cli([]).storage


def train_state(
    data_url: str,
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
    log=print,
):
    """A ``TrainState`` trained on the train split at ``data_url`` for ``steps`` steps or ``seconds``."""
    import numpy as np
    import torch

    from pipeline.data import load_split_arrays
    from pipeline.ddpm.schedule import NoiseSchedule
    from pipeline.ddpm.unet import preset as unet_preset
    from pipeline.train.state import OptimConfig, TrainState

    split = load_split_arrays(data_url, _storage(), "train")
    x = torch.from_numpy(split.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    sched = NoiseSchedule.from_dict(schedule) if schedule else NoiseSchedule()
    torch.set_num_threads(threads)
    state = TrainState(
        unet_preset(preset, image_size=x.shape[-1], in_channels=x.shape[1]),
        sched,
        OptimConfig(lr=lr, warmup_images=min(5000, batch_size * 50), ema_decay=ema_decay),
        seed=seed,
    )
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    losses = []
    while True:
        if steps is not None and state.step_count >= steps:
            break
        if seconds is not None and time.perf_counter() - t0 >= seconds:
            break
        idx = torch.from_numpy(rng.choice(len(x), batch_size, replace=False))
        r = state.train_step([x[idx]])
        state.images_seen += r.images
        losses.append(r.loss_sum / r.images)
        if state.step_count % 500 == 0:
            log(f"train: step {state.step_count}, loss {np.mean(losses[-500:]):.4f}, {time.perf_counter() - t0:.0f} s")
    log(f"train: {state.step_count} steps, {state.images_seen} images, {time.perf_counter() - t0:.0f} s")
    return state


def log_training_run(
    tracking_uri: str,
    state,
    *,
    data_url: str,
    preset: str,
    experiment: str = "ddpm",
    run_name: str | None = None,
    checkpoint: bool = True,
) -> str:
    """An MLflow run as the training job makes it: tag, flattened params, config.json, a checkpoint."""
    from mlflow.tracking import MlflowClient

    from pipeline.checkpoint import checkpoint_name, sampling_export
    from pipeline.config import Settings
    from pipeline.tracking import RUN_NAME_TAG

    run_name = run_name or time.strftime("bench-sample-%Y%m%d-%H%M%S")
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
            },
            "train": {"run_name": run_name, "total_images": max(state.images_seen, 1)},
            "tracking": {"uri": tracking_uri, "experiment": experiment},
        }
    )
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name})
    run_id = run.info.run_id
    from mlflow.entities import Param

    params = [Param(k, v[:6000]) for k, v in settings.flat_params().items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(settings.dump())
        client.log_artifact(run_id, str(Path(d) / "config.json"))
        if checkpoint:
            p = Path(d) / f"{checkpoint_name(state.images_seen)}.pt"
            p.write_bytes(sampling_export(state.state_dict()))
            client.log_artifact(run_id, str(p), "checkpoints")
    client.set_terminated(run_id, "FINISHED")
    return run_id


# ------------------------------------------------------------------------------------------------
# The benchmark


class BenchSettings(JobSettings):
    """Benchmark jobs/sample.py: 2 actors vs 1, DDIM-50 vs 1000-step ancestral (speed and quality)."""

    run_id: str | None = Field(None, description="MLflow run to evaluate; default: train a digits model first")
    data_url: str = Field("s3://ddpm-data/bench-sample/digits", description="digits dataset for the trained model")
    train_seconds: float = Field(600, gt=0, description="training time of the digits model (no --run-id)")
    preset: str = Field("digits", description="U-Net preset of the trained model")
    scaling_images: int = Field(1024, ge=1, description="images per run of the 1-vs-2-actor comparison")
    scaling_batch: int = Field(128, ge=1, description="batch size of the 1-vs-2-actor comparison")
    repeats: int = Field(2, ge=1, description="interleaved repeats of the 1-vs-2-actor comparison")
    quality_images: int = Field(512, ge=1, description="images for DDIM-50 vs ancestral-1000 (speed and quality)")
    quality_batch: int = Field(128, ge=1, description="batch size for DDIM-50 vs ancestral-1000")
    parts: list[Literal["scaling", "quality"]] = Field(
        ["scaling", "quality"], description="what to measure: scaling (1 vs 2 actors), quality (DDIM vs ancestral)"
    )
    out: str | None = Field(None, description="also write the figures to this JSON file")
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()


def _sample(run_id: str, *args: str) -> dict[str, Any]:
    mod = load_job("sample")
    s = mod.SampleSettings.from_cli(["--run-id", run_id, "--no-progress", *args])
    return mod.run(s)


def _same_npz(uri: str, run_id: str, *paths: str) -> bool:
    import numpy as np
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    arrays = []
    with tempfile.TemporaryDirectory() as d:
        for i, p in enumerate(paths):
            with np.load(client.download_artifacts(run_id, p, f"{d}/{i}")) as z:
                arrays.append((z["images"], z["seeds"]))
    return all(np.array_equal(a[0], arrays[0][0]) and np.array_equal(a[1], arrays[0][1]) for a in arrays[1:])


def main(argv: list[str] | None = None) -> int:
    try:
        b = BenchSettings.from_cli(argv, prog="bench_sample.py")
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if b.dry_run:
        print(b.dump())
        return 0
    if not b.tracking.uri:
        print("error: tracking.uri: no MLflow server (start the stack or set MLFLOW_TRACKING_URI)", file=sys.stderr)
        return 2
    import platform

    import torch

    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    run_id = b.run_id
    if run_id is None:
        prepare_digits(b.data_url)
        state = train_state(
            b.data_url, preset=b.preset, seconds=b.train_seconds, batch_size=128, lr=1e-3, ema_decay=0.999
        )
        run_id = log_training_run(b.tracking.uri, state, data_url=b.data_url, preset=b.preset)
        report["trained"] = {
            "preset": b.preset,
            "seconds": b.train_seconds,
            "images_seen": state.images_seen,
            "steps": state.step_count,
        }
        print(f"training run logged: {run_id}")
    report["run_id"] = run_id
    stamp = time.strftime("%Y%m%dT%H%M%S")

    if "scaling" in b.parts:
        _scaling(b, run_id, stamp, report)
    if "quality" in b.parts:
        _quality(b, run_id, stamp, report)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if b.out:
        Path(b.out).write_text(text + "\n")
    return 0


def _scaling(b: BenchSettings, run_id: str, stamp: str, report: dict[str, Any]) -> None:
    """1 vs 2 actors, the same seeds, interleaved."""
    common = [
        "--num-images",
        str(b.scaling_images),
        "--batch-size",
        str(b.scaling_batch),
        "--method",
        "ddim",
        "--steps",
        "50",
        "--no-quality",
        "--cluster.threads-per-worker",
        "1",
    ]
    rates: dict[int, list[float]] = {1: [], 2: []}
    per_cpu: dict[int, list[float]] = {1: [], 2: []}
    shares: dict[int, list[float]] = {1: [], 2: []}
    loads: list[float] = []
    names: dict[int, str] = {}
    for r in range(b.repeats):
        for w in (1, 2) if r % 2 == 0 else (2, 1):
            out = _sample(run_id, *common, "--workers", str(w), "--name", f"bench-scaling-w{w}-r{r}-{stamp}")
            cost = out["cost"]
            rates[w].append(cost["images_per_s"])
            per_cpu[w].append(cost["images"] / cost["actor_cpu_s"])
            shares[w].append(cost["actor_cpu_share"])
            loads.append(os.getloadavg()[0])
            names[w] = out["artifacts"]["samples.npz"]
            print(
                f"scaling: {w} actor(s), repeat {r}: {cost['images_per_s']:.2f} images/s, "
                f"{per_cpu[w][-1]:.2f} images per actor CPU second, actors got {cost['actor_cpu_share']:.0%} "
                f"of their cores, load average {loads[-1]:.1f}",
                flush=True,
            )
    speedups = [two / one for one, two in zip(rates[1], rates[2], strict=True)]
    # The same seeds through 1 actor and 2, and with another batch size: the same bytes?
    other = _sample(
        run_id, *common[:2], "--batch-size", "96", *common[4:], "--workers", "2", "--name", f"bench-batch96-{stamp}"
    )
    identical = _same_npz(b.tracking.uri, run_id, names[1], names[2], other["artifacts"]["samples.npz"])
    report["scaling"] = {
        "images": b.scaling_images,
        "batch_size": b.scaling_batch,
        "sampler": "ddim50",
        "images_per_s_1_actor": rates[1],
        "images_per_s_2_actors": rates[2],
        "speedup_per_repeat": speedups,
        "speedup_median": statistics.median(speedups),
        "images_per_actor_cpu_s_1_actor": per_cpu[1],
        "images_per_actor_cpu_s_2_actors": per_cpu[2],
        "actor_cpu_share_1_actor": shares[1],
        "actor_cpu_share_2_actors": shares[2],
        "load_average_1min_after_each_run": loads,
        "identical_images_1_vs_2_actors_and_batch_96": identical,
    }


def _quality(b: BenchSettings, run_id: str, stamp: str, report: dict[str, Any]) -> None:
    """DDIM-50 vs ancestral-1000 on 2 actors: speed and quality."""
    q = {}
    for method in ("ddim", "ancestral"):
        args = [
            "--num-images",
            str(b.quality_images),
            "--batch-size",
            str(b.quality_batch),
            "--method",
            method,
            "--steps",
            "50",
            "--workers",
            "2",
        ]
        out = _sample(run_id, *args, "--name", f"bench-{method}-{stamp}")
        tag = next(iter(out["metrics"])).split("/")[1]  # every key is eval/<tag>/<metric>
        m = {k.split("/", 2)[2]: v for k, v in out["metrics"].items()}
        cost = out["cost"]
        m |= {
            "images_per_actor_cpu_s": cost["images"] / cost["actor_cpu_s"],
            "actor_cpu_share": cost["actor_cpu_share"],
            "load_average_1min_after": os.getloadavg()[0],
        }
        q[tag] = {"eval_name": out["eval_name"], **m}
        print(f"{tag}: {json.dumps(m, indent=None)}", flush=True)
    (d_tag, d), (a_tag, a) = list(q.items())
    fd_key = next(k for k in d if k.startswith("fd_") and not k.endswith(("_floor", "_floor_eval_halves")))
    report["ddim_vs_ancestral"] = {
        "images": b.quality_images,
        "batch_size": b.quality_batch,
        "workers": 2,
        "runs": q,
        "speed_ratio": d["images_per_s"] / a["images_per_s"],
        "speed_ratio_per_actor_cpu_s": d["images_per_actor_cpu_s"] / a["images_per_actor_cpu_s"],
        "model_evals_ratio": a["model_evals_per_image"] / d["model_evals_per_image"],
        "metric": fd_key,
        f"{fd_key}_ddim": d[fd_key],
        f"{fd_key}_ancestral": a[fd_key],
        "floor": d.get(f"{fd_key}_floor"),
        "floor_eval_halves": d.get(f"{fd_key}_floor_eval_halves"),
    }


if __name__ == "__main__":
    sys.exit(main())
