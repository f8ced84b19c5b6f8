"""Benchmark (a) of issue 21: ingestion images/s, Ray Data on 1 and 2 CPUs vs the one-process converter.

    python benchmarks/bench_ingest.py [--images 20000] [--size 256] [--to 64] [--json-out FILE]

Generates a folder of ``--images`` JPEGs at ``--size`` px (10 class folders, smooth colour fields with
noise, quality 90) in a temporary directory, then runs ``jobs/prepare_data.py --source folder`` on it,
as a user would, into a temporary local directory at ``--to`` px, RGB, PNG: ``--engine local`` (today's
one-process converter: the baseline), then ``--engine ray --ray-cpus 1`` and ``--ray-cpus 2`` (Ray Data
on a new local Ray; RAY_ADDRESS is removed so no other cluster is used). One run each; images/s =
images written / the command's wall time (start-up included); for Ray also the job's own figure for
the conversion (its shard tasks, Ray's start-up and the listing excluded). Ratios are against the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]


def generate(root: Path, n: int, size: int, seed: int = 0) -> float:
    """``n`` JPEGs under root/c0..c9; returns the bytes written (MB)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    total = 0
    for i in range(n):
        a, b, c = rng.uniform(0, 255, 3), rng.uniform(-120, 120, 3), rng.uniform(-120, 120, 3)
        img = a + b * xx[..., None] + c * yy[..., None] + rng.normal(0, 12, (size, size, 3))
        path = root / f"c{i % 10}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        total += path.stat().st_size
    return total / 1e6


def ingest(folder: Path, out: Path, to: int, extra: list[str]) -> dict:
    cmd = [sys.executable, str(REPO_ROOT / "jobs" / "prepare_data.py"), "--source", "folder", "--folder", str(folder)]
    cmd += ["--out", str(out), "--image-size", str(to), "--channels", "3", "--no-progress", *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    written = sum(int(n) for n in re.findall(r"^\w+: (\d+) images in", p.stdout, re.M))
    job = re.search(r"read in ([\d.]+) s: (\d+) images/s", p.stdout)
    return {
        "images": written,
        "wall_s": wall,
        "images_per_s": written / wall,
        "job_images_per_s": int(job[2]) if job else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--to", type=int, default=64)
    ap.add_argument("--json-out")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        folder = Path(tmp) / "jpegs"
        t0 = time.perf_counter()
        mb = generate(folder, a.images, a.size)
        print(
            f"generated {a.images} JPEGs at {a.size} px ({mb:.0f} MB) in {time.perf_counter() - t0:.0f} s", flush=True
        )
        runs = {}
        for name, extra in [
            ("one process (--engine local)", ["--engine", "local"]),
            ("Ray Data, 1 CPU", ["--engine", "ray", "--ray-cpus", "1"]),
            ("Ray Data, 2 CPUs", ["--engine", "ray", "--ray-cpus", "2"]),
        ]:
            runs[name] = ingest(folder, Path(tmp) / name.split()[0].lower() / extra[-1], a.to, extra)
            print(f"{name}: {runs[name]}", flush=True)
    base = next(iter(runs.values()))["images_per_s"]
    print(
        f"\n{a.images} JPEGs {a.size} px -> {a.to} px PNG, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )
    print(f"{'':32} {'wall s':>8} {'img/s':>8} {'ratio':>6} {'tasks img/s':>12}")
    for name, r in runs.items():
        job = r["job_images_per_s"] or ""
        print(f"{name:32} {r['wall_s']:8.1f} {r['images_per_s']:8.0f} {r['images_per_s'] / base:5.2f}x {job:>12}")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"args": vars(a), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
