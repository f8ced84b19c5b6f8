"""The main job end to end on this machine: stack -> digits shards -> Ray Train -> sampling job -> MLflow.

    bash infra/setup.sh && .venv/bin/python jobs/demo.py

Starts (or reuses) the local stack, writes the embedded digits dataset to S3 as WebDataset shards
(once), submits training with `ray job submit -- python jobs/train.py`, runs
`python jobs/sample.py --run-id <run>`, and prints where to look. Each phase is timed. Flags after
`--` go to jobs/train.py (e.g. `-- --train.total-images 50000`).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from infra.stack import Stack

REPO = Path(__file__).resolve().parents[1]
DATA_URL = "s3://ddpm-data/digits"
# The demo's CPU recipe: the `digits` U-Net, 2 workers x 1 thread, 120k images (~75 epochs of the
# 1,617 training digits). The optimisation settings are the best trial of the digits sweep
# (jobs/spaces/digits.yaml, docs/quality.md): v-prediction, Min-SNR-5 weighting, a cosine learning rate
# from 2e-3, EMA 0.998.
TRAIN_ARGS = [
    "--model.preset", "digits", "--train.total-images", "120000", "--train.batch-size", "128",
    "--train.lr", "2e-3", "--train.lr-schedule", "cosine", "--train.warmup-images", "5000",
    "--train.ema-decay", "0.998", "--train.loss-weighting", "min_snr", "--diffusion.objective", "v",
    "--train.checkpoint-every-images", "50000", "--train.sample-every-images", "50000",
    "--train.log-every-steps", "20", "--sample.method", "ddim", "--sample.steps", "100",
]  # fmt: skip
SAMPLE_ARGS = ["--num-images", "256", "--batch-size", "64", "--workers", "2"]
PROGRESS_EVERY_S = 10.0  # the sampling job's progress bar, captured here, becomes a line this often
BAR = re.compile(r"^sampling:\s+(\d+)%\|")


def phase(name: str, timings: dict[str, float], fn):
    print(f"\n=== {name} ===", flush=True)
    t0 = time.time()
    out = fn()
    timings[name] = time.time() - t0
    print(f"--- {name}: {timings[name]:.0f} s", flush=True)
    return out


def run(cmd: list[str], env: dict[str, str]) -> str:
    """Run a command, streaming its output; returns that output. Text mode turns a progress bar's
    carriage returns into lines: of those, one per ``PROGRESS_EVERY_S`` and the first at 100% are shown."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines, last_bar, shown = [], float("-inf"), ""
    for line in proc.stdout:
        lines.append(line)
        if bar := BAR.match(line):
            if time.monotonic() - last_bar < PROGRESS_EVERY_S and (bar.group(1) != "100" or shown == "100"):
                continue
            last_bar, shown = time.monotonic(), bar.group(1)
        sys.stdout.write(line)
    if proc.wait() != 0:
        raise SystemExit(f"demo: command failed (exit {proc.returncode}): {' '.join(cmd)}")
    return "".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample-method", default="ancestral", help="sampling job: ancestral (1000 steps) or ddim")
    ap.add_argument("train_args", nargs="*", help="extra flags for jobs/train.py (after --)")
    args = ap.parse_args()
    timings: dict[str, float] = {}
    py = sys.executable

    up = phase("stack", timings, lambda: Stack().up(timeout=240, say=lambda m: print(m, flush=True)))
    env = {**os.environ, **up.env}  # the subprocesses below read the stack's standard variables

    def data() -> None:
        from pipeline.config import StorageConfig
        from pipeline.data.prepare import ensure_dataset

        m = ensure_dataset(DATA_URL, StorageConfig.from_env(env))
        print(f"digits shards in S3 ({m.num_samples} training images) at {DATA_URL}")

    phase("data", timings, data)

    run_name = time.strftime("demo-%Y%m%d-%H%M%S")
    # --working-dir: the job runs from a copy of this checkout (what .gitignore leaves out stays here);
    # the job's driver takes S3 and MLflow from the Ray head's environment, which the stack set.
    ray_cli = str(Path(py).parent / "ray")
    gpus = torch.cuda.device_count()  # one worker per GPU (at most 2): use_gpu=auto refuses more workers than GPUs
    train_cmd = [ray_cli, "job", "submit", "--address", env["RAY_ADDRESS"], "--working-dir", str(REPO), "--"]
    train_cmd += ["python", "jobs/train.py", *TRAIN_ARGS, "--cluster.num-workers", str(min(2, gpus) if gpus else 2)]
    train_cmd += ["--train.run-name", run_name, *args.train_args]
    train_logs = phase("training", timings, lambda: run(train_cmd, env))
    found, page = re.search(r"MLFLOW_RUN_ID=([0-9a-f]{32})", train_logs), re.search(r"MLflow run: (\S+)", train_logs)
    if not (found and page):
        raise SystemExit("demo: the training job did not report an MLflow run (is tracking configured?)")
    run_id = found.group(1)

    out_dir = REPO / "outputs" / run_name
    sample_cmd = [py, "jobs/sample.py", "--run-id", run_id, *SAMPLE_ARGS, "--work-dir", str(out_dir)]
    sample_cmd += ["--sample.method", args.sample_method]  # ddim: the job's default of 50 steps
    sample_logs = phase("sampling", timings, lambda: run(sample_cmd, env))

    grid = re.search(r'"grid.png": "([^"]+)"', sample_logs)
    fd = re.search(r'"(eval/[^"]*fd[^"]*)": ([0-9.e+-]+)', sample_logs)
    print("\n=== done ===")
    print(f"MLflow UI:        {env['MLFLOW_TRACKING_URI'].rstrip('/')}")
    if user := env.get("MLFLOW_TRACKING_USERNAME"):
        print(f"MLflow login:     user {user}, password in {Path(env['DDPM_STACK_DIR']) / 'credentials.json'}")
    print(f"training run:     {run_name} (MLflow run id {run_id})")
    print(f"run page:         {page.group(1)}")
    if grid:
        print(f"sample grid:      MLflow artifact {grid.group(1)} (run page > Artifacts); local copy {out_dir}")
    if fd:
        print(f"quality:          {fd.group(1)} = {float(fd.group(2)):.2f}")
    print("phase times:      " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print("stop the stack:   .venv/bin/python -m infra.stack down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
