#!/usr/bin/env python
"""Throughput benchmark of the trainer and the sampler (issues 8 and 2). torch (and numpy) only.

    python benchmarks/bench.py [model] --preset cifar --image-size 32 --channels 3 --device cuda --json out.json
    python benchmarks/bench.py --preset tiny --image-size 8 --channels 1 --quick --json smoke.json
    python benchmarks/bench.py sampler-vs-seed [--batch 256 --steps 4 --threads 2 --json b.json]

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

``sampler-vs-seed`` (issue 2): ``pipeline.ddpm.sampler.sample`` against a loop written like seed 000
(``benchmarks.perf.seed_sampling``: two model evaluations per clipped step, per-step gathers and
square roots), on the same model, interleaved, in clip and no-clip mode.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.perf import (  # noqa: E402
    Timing,
    device_name,
    interleaved,
    model_flops,
    paired_speedup,
    peak_tflops,
    perturb_,
    seed_sampling,
    synchronize,
)
from pipeline.ddpm.sampler import CUDAGraphModel, SamplerOptions, SeededNoise, sample  # noqa: E402
from pipeline.ddpm.schedule import NoiseSchedule  # noqa: E402
from pipeline.ddpm.unet import UNet, preset  # noqa: E402
from pipeline.train.state import OptimConfig, TrainState  # noqa: E402

TOKENS = ("fp32", "math", "channels_last", "bf16", "fused", "compile", "cuda_graph", "cudnn_benchmark")
ALIASES = {"cl": "channels_last", "sdpa": "fp32", "fused_adamw": "fused", "graph": "cuda_graph"}

GPU_TRAIN = (
    "fp32,math,channels_last,bf16,fused,cudnn_benchmark,compile,"
    "bf16+channels_last+fused+cudnn_benchmark,bf16+channels_last+fused+cudnn_benchmark+compile"
)
GPU_SAMPLE = (
    "fp32,math,channels_last,bf16,cudnn_benchmark,cuda_graph,compile,"
    "bf16+channels_last+cudnn_benchmark+cuda_graph,bf16+channels_last+cudnn_benchmark+compile"
)
CPU_TRAIN = "fp32,math,channels_last,bf16,fused,compile,channels_last+compile"
CPU_SAMPLE = "fp32,math,channels_last,bf16,cuda_graph,compile"

GOALS = {"train_images_per_s": 6000.0, "ancestral_1000_images_per_s": 30.0}  # issue 8: one H100, cifar@32


@dataclass(frozen=True)
class Variant:
    name: str
    flags: frozenset[str]

    def __getattr__(self, token: str) -> bool:  # v.bf16, v.channels_last, ...
        if token in TOKENS:
            return token in self.flags
        raise AttributeError(token)


def parse_variant(spec: str) -> Variant:
    flags = set()
    for raw in spec.strip().split("+"):
        tok = ALIASES.get(raw.strip(), raw.strip())
        if tok not in TOKENS:
            raise argparse.ArgumentTypeError(f"unknown variant token {raw!r} in {spec!r}; known: {', '.join(TOKENS)}")
        if tok != "fp32":
            flags.add(tok)
    return Variant(spec.strip(), frozenset(flags))


def parse_variants(specs: str) -> list[Variant]:
    vs = [parse_variant(s) for s in specs.split(",") if s.strip()]
    if not any(not v.flags for v in vs):
        vs.insert(0, parse_variant("fp32"))  # the baseline is always measured
    base = next(v for v in vs if not v.flags)
    return [base] + [v for v in vs if v is not base]


def why_skipped(v: Variant, section: str, device: torch.device, args: argparse.Namespace) -> str | None:
    cuda = device.type == "cuda"
    if v.bf16 and not cuda:
        return "bf16 autocast runs ~300x slower on a CPU without native bf16 matmul (0.2 GFLOP/s here): GPU only"
    if v.fused and not cuda:
        return "TrainState uses fused AdamW only on CUDA" if section == "train" else "fused AdamW is a training option"
    if v.fused and section == "sample":
        return "fused AdamW is a training option"
    if v.cuda_graph and section == "train":
        return "training takes CUDA graphs through compile mode 'reduce-overhead' (--compile-mode)"
    if v.cuda_graph and not cuda:
        return "CUDA graphs need a CUDA device"
    if v.cuda_graph and v.compile:
        return "cuda_graph and compile do not combine (compile mode 'reduce-overhead' is the compiled CUDA-graph path)"
    if v.cudnn_benchmark and not cuda:
        return "cudnn.benchmark is a CUDA setting"
    if v.compile and args.no_compile:
        return "--no-compile"
    if v.compile and not cuda and not args.compile:
        return "torch.compile on CPU takes 1-4 min to compile and is not faster here (docs); --compile forces it"
    mode = args.compile_mode if section == "train" else args.sample_compile_mode
    if v.compile and not cuda and mode in ("reduce-overhead", "max-autotune"):
        return f"compile mode {mode!r} adds CUDA graphs: GPU only"
    return None


@contextmanager
def cudnn_benchmark(on: bool):
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak CUDA memory allocated since the last call (all variants of a section together)."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def loss_diff(a: list[float] | None, b: list[float] | None) -> float | None:
    """Largest relative difference between two per-step loss sequences (over their common steps)."""
    if not a or not b:
        return None
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=False))


def guarded(fn: Callable[[], object], errors: dict[str, str], name: str) -> bool:
    try:
        fn()
        return True
    except Exception as e:  # one failing variant must not lose the others' figures
        errors[name] = f"{type(e).__name__}: {e}"
        return False


# -- model: FLOPs, training, sampling ------------------------------------------------------------------


def unet_config(args: argparse.Namespace, attention: str = "sdpa"):
    return preset(args.preset, image_size=args.image_size, in_channels=args.channels, attention=attention)


def measure_flops(args: argparse.Namespace) -> dict:
    """Counted on the CPU with one image: FLOPs are a property of the maths, not of the device."""
    torch.manual_seed(0)
    model = UNet(unet_config(args, "math"))
    x = torch.randn(1, args.channels, args.image_size, args.image_size)
    t = torch.full((1,), 500, dtype=torch.long)
    out = model_flops(model, x, t)
    out["params"] = sum(p.numel() for p in model.parameters())
    return out


def rate(flops_per_s: float, peak: float | None) -> dict:
    return {
        "achieved_tflops": flops_per_s / 1e12,
        "achieved_gflops": flops_per_s / 1e9,
        "fraction_of_peak": (flops_per_s / 1e12 / peak) if peak else None,
    }


def bench_train(args: argparse.Namespace, device: torch.device, flops: dict, peak: float | None) -> dict:
    variants = parse_variants(args.train_variants)
    skipped, errors, states = {}, {}, {}
    losses: dict[str, list[float]] = {}  # every step's mean loss, per variant
    g = torch.Generator().manual_seed(1)
    shape = (args.batch, args.channels, args.image_size, args.image_size)
    x0 = (torch.rand(shape, generator=g) * 2 - 1).to(device)
    runners: dict[str, Callable[[], object]] = {}
    for v in variants:
        reason = why_skipped(v, "train", device, args)
        if reason:
            skipped[v.name] = reason
            continue
        cfg = OptimConfig(
            warmup_images=0,
            precision="bf16" if v.bf16 else "fp32",
            channels_last=v.channels_last,
            compile=v.compile,
            compile_mode=args.compile_mode,
            fused_adamw=v.fused,
        )

        def build(v=v, cfg=cfg):
            states[v.name] = TrainState(
                unet_config(args, "math" if v.math else "sdpa"), NoiseSchedule(), cfg, device=device, seed=0
            )

        if not guarded(build, errors, v.name):
            continue

        def run(v=v, state=states[v.name]):
            with cudnn_benchmark(v.cudnn_benchmark):
                for _ in range(args.train_steps):
                    r = state.train_step([x0])
                    losses.setdefault(v.name, []).append(r.loss_sum / r.images)

        runners[v.name] = run
    print(
        f"[train] {len(runners)} variants, batch {args.batch}, {args.train_steps} steps x {args.repeats} rounds",
        flush=True,
    )
    timings = interleaved(runners, device=device, warmup=args.warmup, repeats=args.repeats, errors=errors)
    base_name = variants[0].name
    out = {}
    base = timings.get(base_name)
    for name, tm in timings.items():
        ips = args.batch * args.train_steps / tm.median
        row = {
            "images_per_s": ips,
            "step_s": tm.median / args.train_steps,
            "speedup_vs_fp32": paired_speedup(base.times, tm.times) if base else None,
            # Robustness figures for a noisy machine: best round, and the paired ratio of CPU time.
            "best_images_per_s": args.batch * args.train_steps / min(tm.times),
            "speedup_vs_fp32_of_best": min(base.times) / min(tm.times) if base else None,
            "speedup_vs_fp32_cpu_time": paired_speedup(base.cpu_times, tm.cpu_times) if base else None,
            "first_call_s": tm.first_call_s,
            "times_s": tm.times,
            "cpu_times_s": tm.cpu_times,
            # Every variant ran the same steps on the same data with the same timestep/noise draws; the
            # first step is not informative (the zero-initialised output layer predicts 0 everywhere).
            "losses": losses.get(name),
            "loss_rel_diff_vs_fp32": loss_diff(losses.get(name), losses.get(base_name)),
        }
        row.update(rate(ips * flops["fwd_bwd_flops_per_image"], peak))
        out[name] = row
    states.clear()
    runners.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "peak_memory_gib": peak_memory_gib(device),
        "batch": args.batch,
        "steps_per_round": args.train_steps,
        "rounds": args.repeats,
        "warmup_calls": args.warmup,
        "compile_mode": args.compile_mode,
        "baseline": base_name,
        "variants": out,
        "skipped": skipped,
        "failed": errors,
    }


def bench_sample(args: argparse.Namespace, device: torch.device, flops: dict, peak: float | None) -> dict:
    variants = parse_variants(args.sample_variants)
    n = args.sample_steps
    skipped, errors, outputs = {}, {}, {}
    torch.manual_seed(0)
    weights = perturb_(UNet(unet_config(args))).state_dict()
    seeds = list(range(args.sample_batch))
    shape = (args.channels, args.image_size, args.image_size)
    sched_n, sched = NoiseSchedule("linear", n), NoiseSchedule("linear", 1000)
    ancestral, ddim = SamplerOptions("ancestral", clip=True), SamplerOptions("ddim", steps=n, eta=0.0, clip=True)
    runners: dict[str, Callable[[], object]] = {}
    for v in variants:
        reason = why_skipped(v, "sample", device, args)
        if reason:
            skipped[v.name] = reason
            continue
        model = UNet(unet_config(args, "math" if v.math else "sdpa"))
        model.load_state_dict(weights)
        model.to(device).eval().requires_grad_(False)
        if v.channels_last:
            model.to(memory_format=torch.channels_last)
        # One CUDAGraphModel, captured at its first call and replayed by every later call of both
        # methods (sample(cuda_graph=True) captures once per call); capture time is in first_call_s.
        fn = CUDAGraphModel(model) if v.cuda_graph else model
        kw = dict(
            device=device,
            autocast_dtype=torch.bfloat16 if v.bf16 else None,
            channels_last=v.channels_last,
            compile_mode=args.sample_compile_mode if v.compile else None,
        )
        for method, sch, opts in (("ancestral", sched_n, ancestral), ("ddim", sched, ddim)):

            def run(v=v, method=method, sch=sch, opts=opts, kw=kw, fn=fn):
                with cudnn_benchmark(v.cudnn_benchmark):
                    outputs[(v.name, method)] = sample(fn, sch, seeds, shape, opts, **kw)

            runners[f"{v.name}|{method}"] = run
    setup = Timing()
    for _ in range(max(3, args.repeats)):
        t0 = time.perf_counter()
        SeededNoise(seeds, shape, device).initial()
        synchronize(device)
        setup.times.append(time.perf_counter() - t0)
    setup_s = setup.median
    print(
        f"[sample] {len(runners) // 2} variants, batch {args.sample_batch}, {n} steps x {args.repeats} rounds",
        flush=True,
    )
    # Interleaved per method, so a variant's call and the baseline's are close in time.
    timings: dict[str, Timing] = {}
    for method in ("ancestral", "ddim"):
        group = {k: r for k, r in runners.items() if k.endswith(f"|{method}")}
        timings.update(interleaved(group, device=device, warmup=args.warmup, repeats=args.repeats, errors=errors))
    base_name = variants[0].name
    out = {}
    for v in variants:
        ta, td = timings.get(f"{v.name}|ancestral"), timings.get(f"{v.name}|ddim")
        if ta is None or td is None:
            continue
        step_a = max(ta.median - setup_s, 1e-12) / n
        step_d = max(td.median - setup_s, 1e-12) / n
        full_a, full_d = setup_s + 1000 * step_a, setup_s + 50 * step_d
        row = {
            "ancestral_1000_images_per_s": args.sample_batch / full_a,
            "ddim50_images_per_s": args.sample_batch / full_d,
            "ancestral_step_s": step_a,
            "ddim_step_s": step_d,
            "ancestral_1000_run_s": full_a,
            "ddim50_run_s": full_d,
            "best_ancestral_1000_images_per_s": args.sample_batch
            / (setup_s + 1000 * max(min(ta.times) - setup_s, 1e-12) / n),
            "first_call_s": {"ancestral": ta.first_call_s, "ddim": td.first_call_s},
            "times_s": {"ancestral": ta.times, "ddim": td.times},
            "cpu_times_s": {"ancestral": ta.cpu_times, "ddim": td.cpu_times},
        }
        bt_a, bt_d = timings.get(f"{base_name}|ancestral"), timings.get(f"{base_name}|ddim")
        if bt_a is not None and bt_d is not None:
            row["speedup_vs_fp32"] = {
                "ancestral": paired_speedup(bt_a.times, ta.times),
                "ddim": paired_speedup(bt_d.times, td.times),
            }
            row["speedup_vs_fp32_of_best"] = {
                "ancestral": min(bt_a.times) / min(ta.times),
                "ddim": min(bt_d.times) / min(td.times),
            }
            row["speedup_vs_fp32_cpu_time"] = {
                "ancestral": paired_speedup(bt_a.cpu_times, ta.cpu_times),
                "ddim": paired_speedup(bt_d.cpu_times, td.cpu_times),
            }
            diffs = {}
            for method in ("ancestral", "ddim"):
                a, b = outputs.get((v.name, method)), outputs.get((base_name, method))
                if a is not None and b is not None:
                    diffs[method] = float((a.float() - b.float()).abs().max())
            row["max_abs_diff_vs_fp32"] = diffs
        row.update(rate(args.sample_batch * flops["fwd_flops_per_image"] / step_a, peak))
        out[v.name] = row
    return {
        "peak_memory_gib": peak_memory_gib(device),
        "batch": args.sample_batch,
        "timed_steps": n,
        "rounds": args.repeats,
        "warmup_calls": args.warmup,
        "setup_s": setup_s,
        "compile_mode": args.sample_compile_mode,
        "clip": True,
        "extrapolation": (
            "full run = setup + (t_n - setup) * steps/n; ancestral timed on an n-step schedule, DDIM as n "
            "respaced steps of the 1000-step schedule (eta 0); setup = per-seed generators and x_T"
        ),
        "baseline": base_name,
        "variants": out,
        "skipped": skipped,
        "failed": errors,
    }


def best(section: dict, key: str) -> tuple[str | None, float | None]:
    rows = section.get("variants", {})
    if not rows:
        return None, None
    name = max(rows, key=lambda k: rows[k][key])
    return name, rows[name][key]


def run_model(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    name = device_name(device)
    peak = args.peak_tflops if args.peak_tflops else peak_tflops(name) if device.type == "cuda" else None
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    result: dict = {"meta": meta(args, device, name, peak)}
    print(f"device: {name}; peak: {f'{peak:g} TFLOP/s (bf16 dense)' if peak else 'not given'}", flush=True)
    flops = measure_flops(args)
    result["flops"] = flops
    print_flops(args, flops)
    sections = set(args.sections.split(","))
    if "train" in sections:
        result["train"] = bench_train(args, device, flops, peak)
        print_train(result["train"])
        write_json(args, result)
    if "sample" in sections:
        result["sample"] = bench_sample(args, device, flops, peak)
        print_sample(result["sample"])
    goal_applies = args.preset == "cifar" and args.image_size == 32 and device.type == "cuda"
    goals = {}
    for key, section, metric in (
        ("train_images_per_s", "train", "images_per_s"),
        ("ancestral_1000_images_per_s", "sample", "ancestral_1000_images_per_s"),
    ):
        v, val = best(result.get(section, {}), metric)
        goals[key] = {
            "goal": GOALS[key],
            "best_variant": v,
            "best": val,
            "met": (val >= GOALS[key]) if (goal_applies and val is not None) else None,
        }
    result["goals"] = goals
    result["goals_apply"] = goal_applies
    if goal_applies:
        for key, g in goals.items():
            best_s = "n/a" if g["best"] is None else f"{g['best']:.1f}"
            print(
                f"goal {key} >= {g['goal']:g}: best {best_s} ({g['best_variant']}) -> {'met' if g['met'] else 'NOT met'}"
            )
    write_json(args, result)
    return result


# -- sampler-vs-seed (issue 2) -----------------------------------------------------------------------------


class CountingModel(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x, t)


def run_sampler_vs_seed(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = unet_config(args)
    model = perturb_(UNet(cfg)).to(device).eval().requires_grad_(False)
    model_cl = UNet(cfg).to(device).eval().requires_grad_(False)
    model_cl.load_state_dict(model.state_dict())
    model_cl.to(memory_format=torch.channels_last)
    n = args.steps
    sched = NoiseSchedule("linear", n)
    seeds = list(range(args.batch))
    shape = (args.channels, args.image_size, args.image_size)

    def ours(clip: bool, cl: bool = False, compiled: bool = False):
        m = model_cl if cl else model
        mode = (args.sample_compile_mode or "default") if compiled else None
        opts = SamplerOptions("ancestral", clip=clip)
        return lambda: sample(m, sched, seeds, shape, opts, device=device, channels_last=cl, compile_mode=mode)

    def seed(clip: bool):
        # As in the seed: x_T = torch.randn(shape) inside the sampling call, z = torch.randn_like(x_t).
        return lambda: seed_sampling(model, sched, torch.randn((args.batch, *shape), device=device), clipping=clip)

    runners = {
        "sample|clip": ours(True),
        "seed|clip": seed(True),
        "sample|noclip": ours(False),
        "seed|noclip": seed(False),
    }
    if not args.no_channels_last:
        runners["sample+channels_last|clip"] = ours(True, cl=True)
        runners["sample+channels_last|noclip"] = ours(False, cl=True)
    if args.compile:  # compilation happens in the warm-up call and is not timed
        runners["sample+compile|clip"] = ours(True, compiled=True)
        runners["sample+compile|noclip"] = ours(False, compiled=True)

    # Model evaluations per step of each loop (untimed), and the two loops agree given the same noise.
    counts = {}
    for clip in (True, False):
        for label in ("sample", "seed"):
            cm = CountingModel(model)
            if label == "sample":
                sample(cm, sched, seeds[:2], shape, SamplerOptions("ancestral", clip=clip), device=device)
            else:
                seed_sampling(cm, sched, torch.randn((2, *shape), device=device), clipping=clip)
            counts[f"{label}|{'clip' if clip else 'noclip'}"] = cm.calls / n
    agree = {}
    for clip in (True, False):
        noise = SeededNoise(seeds[:8], shape, device)
        x_T = noise.initial()
        ref = seed_sampling(model, sched, x_T, clipping=clip, noise_fn=lambda _x, noise=noise: noise.next())
        got = sample(model, sched, seeds[:8], shape, SamplerOptions("ancestral", clip=clip), device=device)
        agree["clip" if clip else "noclip"] = float((ref - got).abs().max())

    print(
        f"[sampler-vs-seed] {args.preset}@{args.image_size}, batch {args.batch}, {n} steps, "
        f"{torch.get_num_threads()} threads, {args.repeats} rounds",
        flush=True,
    )
    # Interleaved per mode: the loops compared are timed back to back, round after round.
    timings: dict[str, Timing] = {}
    for mode in ("clip", "noclip"):
        group = {k: r for k, r in runners.items() if k.endswith(f"|{mode}")}
        timings.update(interleaved(group, device=device, warmup=args.warmup, repeats=args.repeats))
    rows = {}
    for name, tm in timings.items():
        rows[name] = {
            "step_s": tm.median / n,
            "cpu_step_s": statistics.median(tm.cpu_times) / n,
            "first_call_s": tm.first_call_s,  # includes compilation for the compiled rows
            "times_s": tm.times,
            "cpu_times_s": tm.cpu_times,
            "model_evals_per_step": counts.get(name.replace("+channels_last", "").replace("+compile", "")),
        }
    ratios, cpu_ratios = {}, {}
    for mode in ("clip", "noclip"):
        seed = timings[f"seed|{mode}"]
        for label in ("sample", "sample+channels_last", "sample+compile"):
            if f"{label}|{mode}" in timings:
                ours_t = timings[f"{label}|{mode}"]
                ratios[f"{label}_vs_seed|{mode}"] = paired_speedup(seed.times, ours_t.times)
                cpu_ratios[f"{label}_vs_seed|{mode}"] = paired_speedup(seed.cpu_times, ours_t.cpu_times)
    result = {
        "meta": meta(args, device, device_name(device), None),
        "steps": n,
        "batch": args.batch,
        "rounds": args.repeats,
        "loops": rows,
        "ratios": ratios,
        "ratios_cpu_time": cpu_ratios,
        "goals": {"clip": 1.9, "noclip": 1.1},
        "max_abs_diff_seed_vs_sample_same_noise": agree,
    }
    print(f"{'loop':34s} {'s/step':>9s} {'cpu s/step':>10s} {'evals/step':>10s}")
    for name, r in rows.items():
        ev = r["model_evals_per_step"]
        print(f"{name:34s} {r['step_s']:9.4f} {r['cpu_step_s']:10.4f} {ev if ev is not None else '':>10}")
    for k, v in ratios.items():
        goal = result["goals"][k.split("|")[1]]
        print(f"{k:40s} {v:6.2f}x wall, {cpu_ratios[k]:6.2f}x cpu time  (goal >= {goal}x)")
    print(f"same noise, seed loop vs sample: max |diff| {agree}")
    write_json(args, result)
    return result


# -- output -------------------------------------------------------------------------------------------------


def meta(args: argparse.Namespace, device: torch.device, name: str, peak: float | None) -> dict:
    m = {
        "command": " ".join(sys.argv),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": str(device),
        "device_name": name,
        "peak_tflops": peak,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "preset": args.preset,
        "image_size": args.image_size,
        "channels": args.channels,
        "quick": getattr(args, "quick", False),
        "args": {k: v for k, v in vars(args).items() if isinstance(v, str | int | float | bool | type(None))},
    }
    if device.type == "cuda":
        m.update(
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
            cudnn_tf32=torch.backends.cudnn.allow_tf32,
            cudnn_benchmark_default=torch.backends.cudnn.benchmark,
        )
    return m


def print_flops(args: argparse.Namespace, f: dict) -> None:
    print(
        f"{args.preset}@{args.image_size}x{args.image_size}x{args.channels}: {f['params'] / 1e6:.2f}M params; "
        f"forward {f['fwd_flops_per_image'] / 1e9:.3f} GFLOP/image ({f['fwd_gmac_per_image']:.3f} GMAC); "
        f"forward+backward {f['fwd_bwd_flops_per_image'] / 1e9:.3f} GFLOP/image ({f['train_over_fwd']:.2f}x)"
    )


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _frac(r: dict) -> str:
    return f"{100 * r['fraction_of_peak']:.1f}%" if r.get("fraction_of_peak") is not None else "-"


def _flops(r: dict) -> str:
    return f"{r['achieved_tflops']:.1f} TF/s" if r["achieved_tflops"] >= 1 else f"{r['achieved_gflops']:.1f} GF/s"


def print_skipped(s: dict) -> None:
    for name, why in s["skipped"].items():
        print(f"{name:44s} skipped: {why}")
    for name, why in s["failed"].items():
        print(f"{name:44s} FAILED: {why}")


def print_train(s: dict) -> None:
    print(f"\ntraining (TrainState.train_step), batch {s['batch']}; ratios: paired medians (wall | CPU time):")
    print(
        f"{'variant':44s} {'img/s':>9s} {'best':>9s} {'vs fp32':>8s} {'cpu':>7s} {'achieved':>11s} {'of peak':>7s} "
        f"{'loss diff':>9s}"
    )
    for name, r in s["variants"].items():
        d = r["loss_rel_diff_vs_fp32"]
        print(
            f"{name:44s} {r['images_per_s']:9.1f} {r['best_images_per_s']:9.1f} {_x(r['speedup_vs_fp32']):>8s} "
            f"{_x(r['speedup_vs_fp32_cpu_time']):>7s} {_flops(r):>11s} {_frac(r):>7s} "
            f"{'' if d is None else f'{d:.1e}':>9s}"
        )
    print_skipped(s)


def print_sample(s: dict) -> None:
    print(
        f"\nsampling (pipeline.ddpm.sampler.sample), batch {s['batch']}, extrapolated from {s['timed_steps']} steps; "
        "ratios (ancestral): paired medians (wall | CPU time):"
    )
    print(
        f"{'variant':44s} {'anc-1000/s':>10s} {'best':>8s} {'ddim-50/s':>9s} {'vs fp32':>8s} {'cpu':>7s} "
        f"{'achieved':>11s} {'of peak':>7s} {'max|diff|':>9s}"
    )
    for name, r in s["variants"].items():
        sp = r.get("speedup_vs_fp32", {}).get("ancestral")
        cpu = r.get("speedup_vs_fp32_cpu_time", {}).get("ancestral")
        diff = r.get("max_abs_diff_vs_fp32", {}).get("ancestral")
        print(
            f"{name:44s} {r['ancestral_1000_images_per_s']:10.2f} {r['best_ancestral_1000_images_per_s']:8.2f} "
            f"{r['ddim50_images_per_s']:9.1f} {_x(sp):>8s} {_x(cpu):>7s} {_flops(r):>11s} {_frac(r):>7s} "
            f"{'' if diff is None else f'{diff:.1e}':>9s}"
        )
    print_skipped(s)


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def write_json(args: argparse.Namespace, result: dict) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(_clean(result), indent=2, allow_nan=False) + "\n")


# -- command line -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="model", choices=["model", "sampler-vs-seed"])
    p.add_argument("--preset", default=None, help="tiny | digits | cifar (model: cifar; sampler-vs-seed: digits)")
    p.add_argument("--image-size", type=int, default=None, help="model: 32; sampler-vs-seed: 8")
    p.add_argument("--channels", type=int, default=None, help="model: 3; sampler-vs-seed: 1")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (sampler-vs-seed: 2)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny batches, 1 warm-up, 2 rounds")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per variant (GPU 3, CPU 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (GPU 7, CPU 11; sampler-vs-seed 15)")
    g = p.add_argument_group("model")
    g.add_argument("--sections", default="train,sample", help="train,sample")
    g.add_argument("--batch", type=int, default=None, help="training batch (GPU 256, CPU 128); sampler-vs-seed: 256")
    g.add_argument("--train-steps", type=int, default=None, help="optimizer steps per timed round (GPU 5, CPU 1)")
    g.add_argument("--sample-batch", type=int, default=None, help="sampling batch (GPU 1024, CPU 256)")
    g.add_argument("--sample-steps", type=int, default=None, help="timed sampling steps per call (GPU 16, CPU 4)")
    g.add_argument("--train-variants", default=None, help="comma-separated, e.g. fp32,bf16+channels_last")
    g.add_argument("--sample-variants", default=None, help="comma-separated, e.g. fp32,bf16+cuda_graph")
    g.add_argument(
        "--compile", action="store_true", help="allow torch.compile variants on CPU (sampler-vs-seed: add its rows)"
    )
    g.add_argument("--no-compile", action="store_true", help="skip every torch.compile variant")
    g.add_argument("--compile-mode", default="default", help="training torch.compile mode")
    g.add_argument("--sample-compile-mode", default=None, help="sampling compile mode (GPU reduce-overhead)")
    g.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (cuDNN convs use TF32 by default)")
    g.add_argument("--peak-tflops", type=float, default=None, help="peak for the fraction (default: table)")
    g = p.add_argument_group("sampler-vs-seed")
    g.add_argument("--steps", type=int, default=4, help="sampling steps per timed call")
    g.add_argument("--no-channels-last", action="store_true", help="skip the sample(channels_last) rows")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = torch.device(args.device).type == "cuda"
    vs_seed = args.command == "sampler-vs-seed"
    if args.threads is None and vs_seed and not cuda:
        args.threads = 2
    if args.threads:
        torch.set_num_threads(args.threads)
    d = lambda value, default: default if value is None else value
    args.preset = d(args.preset, "digits" if vs_seed else "cifar")
    args.image_size = d(args.image_size, 8 if vs_seed else 32)
    args.channels = d(args.channels, 1 if vs_seed else 3)
    q = args.quick
    args.warmup = d(args.warmup, 1 if (q or not cuda) else 3)
    if vs_seed:
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
    if args.command == "sampler-vs-seed":
        return run_sampler_vs_seed(args)
    return run_model(args)


if __name__ == "__main__":
    main()
