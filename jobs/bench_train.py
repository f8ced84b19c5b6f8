"""Training throughput on the local stack, measured in one run (issue 5's figures).

    .venv/bin/python jobs/bench_train.py [--images 30000] [--json out.json]

1. Ray Train with 1 and with 2 CPU workers of one thread each: steady-state images/s and the
   2-vs-1 ratio (goal >= 1.8x on 2 cores).
2. The same loop (pipeline.trainer.train_worker) under plain torch.distributed (2 processes,
   gloo, started with torch.multiprocessing) vs Ray Train with 2 workers: per-step time overhead
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def settings_for(images: int, workers: int, tracking: bool = True):
    from pipeline.config import Settings

    args = [
        "--model.preset", "digits",
        "--train.total-images", str(images),
        "--train.batch-size", "128",
        "--train.checkpoint-every-images", str(max(images // 3, 1)),
        "--train.sample-every-images", "0",
        "--train.grid-size", "16",
        "--sample.method", "ddim", "--sample.steps", "20",
        "--train.log-every-steps", "20",
        "--cluster.num-workers", str(workers),
        "--cluster.threads-per-worker", "1",
        "--data.loader-workers", "1",
    ]  # fmt: skip
    s = Settings.from_cli(args)
    if not tracking:
        s.tracking.uri = None
    return s


def ray_run(images: int, workers: int) -> dict:
    from jobs.train import launch
    from pipeline.tracking import find_or_create_run

    s = settings_for(images, workers)
    name = f"bench-ray{workers}-{uuid.uuid4().hex[:6]}"
    s.train.run_name = name
    run_id = find_or_create_run(s.tracking.uri, s.tracking.experiment, name) if s.tracking.uri else None
    t0 = time.time()
    result = launch(s, name, run_id)
    m = dict(result.metrics)
    m["startup_s"] = m["first_step_unix"] - t0
    m["wall_s"] = time.time() - t0
    return m


def _dist_worker(rank: int, world: int, port: int, settings_json: str, out_dir: str) -> None:
    import torch.distributed as td

    from pipeline.config import Settings
    from pipeline.trainer import Session, train_worker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    td.init_process_group("gloo", rank=rank, world_size=world)
    s = Settings.model_validate(json.loads(settings_json))
    final = {}

    def report(metrics, directory, name):
        final.update(metrics)

    train_worker(s, Session(report=report))
    if rank == 0:
        Path(out_dir, "result.json").write_text(json.dumps(final))
    td.destroy_process_group()


def plain_run(images: int, workers: int) -> dict:
    import socket

    import torch.multiprocessing as mp

    s = settings_for(images, workers, tracking=False)
    data = s.model_dump(mode="json")
    data["storage"]["secret_access_key"] = s.storage.secret_access_key.get_secret_value()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tempfile.mkdtemp(prefix="bench-plain-")
    t0 = time.time()
    mp.spawn(_dist_worker, args=(workers, port, json.dumps(data), out), nprocs=workers, join=True)
    m = json.loads(Path(out, "result.json").read_text())
    m["startup_s"] = m["first_step_unix"] - t0
    m["wall_s"] = time.time() - t0
    return m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=30_000, help="images per run")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    from infra.stack import Stack, StackConfig

    env = Stack(StackConfig.resolve()).up(timeout=240).env
    os.environ.update(env)
    from pipeline.config import StorageConfig
    from pipeline.data.manifest import open_manifest

    try:
        open_manifest("s3://ddpm-data/digits", StorageConfig.from_env(env), "train")
    except Exception:
        import subprocess

        subprocess.run([sys.executable, str(REPO / "jobs/prepare_data.py"), "--no-progress"], check=True)

    runs = {
        "ray_1_worker": ray_run(args.images, 1),
        "ray_2_workers": ray_run(args.images, 2),
        "plain_ddp_2_workers": plain_run(args.images, 2),
    }
    r1, r2, p2 = runs["ray_1_worker"], runs["ray_2_workers"], runs["plain_ddp_2_workers"]
    figures = {
        "images_per_run": args.images,
        "ray_1_worker_images_per_s": r1["steady_images_per_s"],
        "ray_2_workers_images_per_s": r2["steady_images_per_s"],
        "scaling_2_vs_1": r2["steady_images_per_s"] / r1["steady_images_per_s"],
        "plain_ddp_2_workers_images_per_s": p2["steady_images_per_s"],
        "ray_step_time_overhead_vs_plain": p2["steady_images_per_s"] / r2["steady_images_per_s"] - 1,
        "ray_startup_s": r2["startup_s"],
        "plain_startup_s": p2["startup_s"],
        "ray_2_workers_tracking_share": r2["tracking_s"] / r2["loop_s"],
        "ray_2_workers_checkpoint_share": r2["checkpoint_s"] / r2["loop_s"],
        "ray_2_workers_grid_share": r2["grid_s"] / r2["loop_s"],
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in figures.items() if k != "runs"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
