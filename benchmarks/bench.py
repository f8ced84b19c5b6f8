#!/usr/bin/env python
"""Throughput benchmark of the trainer and the sampler. torch (and numpy) only: it runs on a bare GPU box.

    python benchmarks/bench.py [model] --preset cifar --image-size 32 --channels 3 --device cuda --json out.json
    python benchmarks/bench.py --preset tiny --image-size 8 --channels 1 --quick --json smoke.json
    python benchmarks/bench.py sampler-vs-reference [--batch 256 --steps 4 --threads 2 --json b.json]

(``python -m benchmarks.bench ...`` from the repository root where the project is not installed.)

``model`` (the default) measures, for one preset and image size:
  * model FLOPs per image (torch.utils.flop_counter.FlopCounterMode: forward, and forward+backward);
  * training images/s of the real ``TrainState.train_step`` (forward, backward, clipping, AdamW, EMA);
  * sampling images/s of ``pipeline.ddpm.sampler.sample`` for a 1000-step ancestral run and a 50-step
    DDIM run, extrapolated from a short run of each (``--sample-steps`` steps; see below);
  * each speed option ("variant") as a ratio against plain fp32 eager, measured in the same run,
    interleaved round by round, as the median over rounds of the paired ratio.
Variants are '+'-joined tokens: fp32 (the baseline), math (math attention instead of SDPA),
channels_last, bf16 (autocast; GPU), fused (fused AdamW; CUDA), compile (torch.compile,
--compile-mode / --sample-compile-mode), cuda_graph (sampling: model call replayed from a CUDA
graph), cudnn_benchmark. Variants that cannot run on the device are listed as skipped, with why.

Sampling extrapolation: a run of n ancestral steps on an n-step schedule (the same work per step
as any step of the 1000-step run) and a DDIM run with n steps on the 1000-step schedule are timed;
full run = setup + (t_n - setup) * 1000/n (or 50/n), where setup (the per-seed generators and x_T)
is timed separately.

``sampler-vs-reference``: ``pipeline.ddpm.sampler.sample`` against the reference per-step loop
(``benchmarks.reference``: two model evaluations per clipped step, per-step gathers and square
roots), on the same model, interleaved, in clip and no-clip mode.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.throughput import run_model
from benchmarks.variants import CPU_SAMPLE, CPU_TRAIN, GPU_SAMPLE, GPU_TRAIN
from benchmarks.vs_reference import run_sampler_vs_reference


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="model", choices=["model", "sampler-vs-reference"])
    p.add_argument("--preset", default=None, help="tiny | digits | cifar (model: cifar; sampler-vs-reference: digits)")
    p.add_argument("--image-size", type=int, default=None, help="model: 32; sampler-vs-reference: 8")
    p.add_argument("--channels", type=int, default=None, help="model: 3; sampler-vs-reference: 1")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (sampler-vs-reference: 2)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny batches, 1 warm-up, 2 rounds")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per variant (GPU 3, CPU 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (GPU 7, CPU 11; sampler-vs-reference 15)")
    g = p.add_argument_group("model")
    g.add_argument("--sections", default="train,sample", help="train,sample")
    g.add_argument(
        "--batch", type=int, default=None, help="training batch (GPU 256, CPU 128); sampler-vs-reference: 256"
    )
    g.add_argument("--train-steps", type=int, default=None, help="optimizer steps per timed round (GPU 5, CPU 1)")
    g.add_argument("--sample-batch", type=int, default=None, help="sampling batch (GPU 1024, CPU 256)")
    g.add_argument("--sample-steps", type=int, default=None, help="timed sampling steps per call (GPU 16, CPU 4)")
    g.add_argument("--train-variants", default=None, help="comma-separated, e.g. fp32,bf16+channels_last")
    g.add_argument("--sample-variants", default=None, help="comma-separated, e.g. fp32,bf16+cuda_graph")
    g.add_argument(
        "--compile",
        action="store_true",
        help="allow torch.compile variants on CPU (sampler-vs-reference: add its rows)",
    )
    g.add_argument("--no-compile", action="store_true", help="skip every torch.compile variant")
    g.add_argument("--compile-mode", default="default", help="training torch.compile mode")
    g.add_argument("--sample-compile-mode", default=None, help="sampling compile mode (GPU reduce-overhead)")
    g.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (cuDNN convs use TF32 by default)")
    g.add_argument("--peak-tflops", type=float, default=None, help="peak for the fraction (default: table)")
    g = p.add_argument_group("sampler-vs-reference")
    g.add_argument("--steps", type=int, default=4, help="sampling steps per timed call")
    g.add_argument("--no-channels-last", action="store_true", help="skip the sample(channels_last) rows")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = torch.device(args.device).type == "cuda"
    vs_ref = args.command == "sampler-vs-reference"
    if args.threads is None and vs_ref and not cuda:
        args.threads = 2
    if args.threads:
        torch.set_num_threads(args.threads)
    d = lambda value, default: default if value is None else value
    args.preset = d(args.preset, "digits" if vs_ref else "cifar")
    args.image_size = d(args.image_size, 8 if vs_ref else 32)
    args.channels = d(args.channels, 1 if vs_ref else 3)
    q = args.quick
    args.warmup = d(args.warmup, 1 if (q or not cuda) else 3)
    if vs_ref:
        args.repeats = d(args.repeats, 2 if q else 15)
        args.batch = d(args.batch, 8 if q else 256)
        args.steps = max(2, min(args.steps, 2) if q else args.steps)  # an n-step schedule needs n >= 2
        return args
    args.repeats = d(args.repeats, 2 if q else (7 if cuda else 11))
    args.batch = d(args.batch, 8 if q else (256 if cuda else 128))
    args.sample_batch = d(args.sample_batch, 8 if q else (1024 if cuda else 256))
    args.train_steps = d(args.train_steps, 1 if q else (5 if cuda else 1))
    args.sample_steps = max(2, d(args.sample_steps, 2 if q else (16 if cuda else 4)))
    args.train_variants = d(args.train_variants, GPU_TRAIN if cuda else CPU_TRAIN)
    args.sample_variants = d(args.sample_variants, GPU_SAMPLE if cuda else CPU_SAMPLE)
    args.sample_compile_mode = d(args.sample_compile_mode, "reduce-overhead" if cuda else "default")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = resolve(build_parser().parse_args(argv))
    if args.command == "sampler-vs-reference":
        return run_sampler_vs_reference(args)
    return run_model(args)


if __name__ == "__main__":
    main()
