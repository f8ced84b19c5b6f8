"""The model benchmark: FLOPs per image, training images/s of ``TrainState.train_step`` and sampling images/s
of ``pipeline.ddpm.sampler.sample``, for each speed option against fp32 eager, and the GPU goals.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from benchmarks.perf import (
    Timing,
    device_name,
    interleaved,
    model_flops,
    paired_speedup,
    peak_tflops,
    perturb_,
    synchronize,
)
from benchmarks.report import meta, print_flops, print_sample, print_train, write_json
from benchmarks.variants import cudnn_benchmark, parse_variants, why_skipped
from pipeline.ddpm.sampler import CUDAGraphModel, SamplerOptions, SeededNoise, sample
from pipeline.ddpm.schedule import NoiseSchedule
from pipeline.ddpm.unet import UNet, preset
from pipeline.train.state import OptimConfig, TrainState

GOALS = {"train_images_per_s": 6000.0, "ancestral_1000_images_per_s": 30.0}  # one H100/H200, cifar preset at 32x32x3


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


def train_section(args: argparse.Namespace, device: torch.device, flops: dict, peak: float | None) -> dict:
    variants = parse_variants(args.train_variants)
    skipped, errors, states = {}, {}, {}
    steps: dict[str, list] = {}  # every step's StepResult, per variant; read after the timing
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
                    # Kept, not read: reading a loss waits for the step, which the training loop avoids.
                    steps.setdefault(v.name, []).append(state.train_step([x0]))

        runners[v.name] = run
    print(
        f"[train] {len(runners)} variants, batch {args.batch}, {args.train_steps} steps x {args.repeats} rounds",
        flush=True,
    )
    timings = interleaved(runners, device=device, warmup=args.warmup, repeats=args.repeats, errors=errors)
    base_name = variants[0].name
    losses = {name: [r.loss_sum / r.images for r in rs] for name, rs in steps.items()}
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
    steps.clear()
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


def sample_section(args: argparse.Namespace, device: torch.device, flops: dict, peak: float | None) -> dict:
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
        result["train"] = train_section(args, device, flops, peak)
        print_train(result["train"])
        write_json(args, result)
    if "sample" in sections:
        result["sample"] = sample_section(args, device, flops, peak)
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
