"""Training throughput on the local stack, measured in one run.

    .venv/bin/python benchmarks/bench_train.py [--images 30000] [--json out.json]

1. Ray Train with 1 and with 2 CPU workers of one thread each: steady-state images/s and the
   2-vs-1 ratio (goal >= 1.8x on 2 cores).
   Also 2 workers at the same per-worker batch (global 256), the usual way scaling is quoted.
2. The same loop (pipeline.train.loop.train_worker) under plain torch.distributed (2 processes,
   gloo, started with torchrun) vs Ray Train with 2 workers: per-step time overhead
   (goal <= 3%) and start-up seconds (launch to the end of the first step), reported apart.
3. The share of wall time spent on MLflow logging and checkpointing in the Ray runs (goal <= 2%).

Uses the digits shards of the local stack (written if missing) and the `digits` preset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path


def settings_for(images: int, workers: int, tracking: bool = True, batch_size: int = 128):
    from pipeline.config import Settings

    args = [
        "--model.preset", "digits",
        "--train.total-images", str(images),
        "--train.batch-size", str(batch_size),
        "--train.checkpoint-every-images", str(max(images // 3, 1)),
        "--train.sample-every-images", "0",
        "--train.grid-size", "16",
        "--sample.method", "ddim", "--sample.steps", "20",
        "--train.log-every-steps", "20",
        "--cluster.num-workers", str(workers),
        "--cluster.threads-per-worker", "1",
        "--cluster.use-gpu", "no",  # a CPU benchmark, whatever the machine has
    ]  # fmt: skip
    s = Settings.from_cli(args)
    if not tracking:
        s.tracking.uri = None
    return s


def ray_run(images: int, workers: int, batch_size: int = 128) -> dict:
    from pipeline.tracking import find_or_create_run
    from pipeline.train.launch import launch

    s = settings_for(images, workers, batch_size=batch_size)
    name = f"bench-ray{workers}-{uuid.uuid4().hex[:6]}"
    s.train.run_name = name
    run_id = find_or_create_run(s.tracking.uri, s.tracking.experiment, name) if s.tracking.uri else None
    t0 = time.time()
    result = launch(s, run_id)
    m = dict(result.metrics)
    m["startup_s"] = m["first_step_unix"] - t0
    m["wall_s"] = time.time() - t0
    return m


def plain_worker(settings_file: str, out_dir: str) -> None:
    """One process of the plain baseline, started by torchrun (which sets RANK, WORLD_SIZE, ...)."""
    import torch.distributed as td

    from pipeline.config import Settings
    from pipeline.train.checkpointer import Session
    from pipeline.train.loop import train_worker

    td.init_process_group("gloo")
    s = Settings.model_validate(json.loads(Path(settings_file).read_text()))
    final = {}
    train_worker(s, Session(report=lambda metrics, directory, name: final.update(metrics)))
    if td.get_rank() == 0:
        Path(out_dir, "result.json").write_text(json.dumps(final))
    td.destroy_process_group()


def plain_run(images: int, workers: int, batch_size: int = 128) -> dict:
    """The same loop under torchrun + gloo, as a user of plain torch.distributed would start it."""
    import socket
    import subprocess

    s = settings_for(images, workers, tracking=False, batch_size=batch_size)
    data = s.model_dump(mode="json")
    data["storage"]["secret_access_key"] = s.storage.secret_access_key.get_secret_value()
    out = tempfile.mkdtemp(prefix="bench-plain-")
    settings_file = Path(out, "settings.json")
    settings_file.touch(mode=0o600)
    settings_file.write_text(json.dumps(data))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={workers}",
        "--master-addr=127.0.0.1", f"--master-port={port}",
        str(Path(__file__).resolve()), "--plain-worker", str(settings_file), out,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(s.cluster.threads_per_worker)}
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env)
    m = json.loads(Path(out, "result.json").read_text())
    m["startup_s"] = m["first_step_unix"] - t0
    m["wall_s"] = time.time() - t0
    return m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=30_000, help="images per run")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--plain-worker", nargs=2, metavar=("SETTINGS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_worker:
        plain_worker(*args.plain_worker)
        return 0

    from infra.stack import Stack, StackConfig
    from pipeline.cluster import refresh_ray_auth

    env = Stack(StackConfig.resolve()).up(timeout=240).env
    os.environ.update(env)
    refresh_ray_auth()  # `up` imported Ray, which cached "no token" before the stack's was set
    from pipeline.config import StorageConfig, TrainConfig
    from pipeline.data.prepare import ensure_dataset

    ensure_dataset("s3://ddpm-data/digits", StorageConfig.from_env(env))

    runs = {
        "ray_1_worker": ray_run(args.images, 1),
        "ray_2_workers": ray_run(args.images, 2),
        # Weak scaling: the per-worker batch stays 128, as GPU scaling figures are usually quoted.
        "ray_2_workers_batch_256": ray_run(args.images, 2, batch_size=256),
        "plain_ddp_2_workers": plain_run(args.images, 2),
    }
    r1, r2, p2 = runs["ray_1_worker"], runs["ray_2_workers"], runs["plain_ddp_2_workers"]
    r2w = runs["ray_2_workers_batch_256"]
    ips = lambda r: r["steady_images_per_s"]
    every = max(args.images // 3, 1)
    default_every = TrainConfig.model_fields["checkpoint_every_images"].default
    each = r2["checkpoint_s"] / max(r2["checkpoints_timed"], 1)
    figures = {
        "images_per_run": args.images,
        "ray_1_worker_images_per_s": ips(r1),
        "ray_2_workers_images_per_s": ips(r2),
        "scaling_2_vs_1": ips(r2) / ips(r1),
        "ray_2_workers_batch_256_images_per_s": ips(r2w),
        "scaling_2_vs_1_same_per_worker_batch": ips(r2w) / ips(r1),
        "plain_ddp_2_workers_images_per_s": ips(p2),
        # Per-step time only: a Ray checkpoint is uploaded to S3, the plain runner's is not persisted.
        "ray_step_time_overhead_vs_plain": p2["step_images_per_s"] / r2["step_images_per_s"] - 1,
        "ray_2_workers_step_images_per_s": r2["step_images_per_s"],
        "plain_ddp_2_workers_step_images_per_s": p2["step_images_per_s"],
        "ray_startup_s": r2["startup_s"],
        "plain_startup_s": p2["startup_s"],
        "ray_2_workers_tracking_share": r2["tracking_s"] / r2["loop_s"],
        "ray_2_workers_checkpoint_share": r2["checkpoint_s"] / r2["loop_s"],  # saves before the final report
        "checkpoint_s_each": each,
        "checkpoint_share_at_bench_interval": each / (every / ips(r2)),
        "checkpoint_share_at_default_interval": each / (default_every / ips(r2)),
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in figures.items() if k != "runs"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
