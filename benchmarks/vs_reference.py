"""``pipeline.ddpm.sampler.sample`` against the reference loop (``benchmarks.reference``) on the same model,
interleaved, with and without clipping: model evaluations per step, the paired speed ratio, and that both
loops give the same images from the same noise.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.perf import Timing, device_name, interleaved, paired_speedup, perturb_
from benchmarks.reference import reference_sampling
from benchmarks.report import meta, write_json
from benchmarks.throughput import unet_config
from pipeline.ddpm.sampler import SamplerOptions, SeededNoise, sample
from pipeline.ddpm.schedule import NoiseSchedule
from pipeline.ddpm.unet import UNet


class CountingModel(torch.nn.Module):
    """Counts the model evaluations a sampling loop makes."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x, t)


def run_sampler_vs_reference(args: argparse.Namespace) -> dict:
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

    def reference(clip: bool):
        # As such loops are written: x_T = torch.randn(shape) inside the sampling call, z = torch.randn_like(x_t).
        x_T = lambda: torch.randn((args.batch, *shape), device=device)
        return lambda: reference_sampling(model, sched, x_T(), clipping=clip)

    runners = {
        "sample|clip": ours(True),
        "reference|clip": reference(True),
        "sample|noclip": ours(False),
        "reference|noclip": reference(False),
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
        for label in ("sample", "reference"):
            cm = CountingModel(model)
            if label == "sample":
                sample(cm, sched, seeds[:2], shape, SamplerOptions("ancestral", clip=clip), device=device)
            else:
                reference_sampling(cm, sched, torch.randn((2, *shape), device=device), clipping=clip)
            counts[f"{label}|{'clip' if clip else 'noclip'}"] = cm.calls / n
    agree = {}
    for clip in (True, False):
        noise = SeededNoise(seeds[:8], shape, device)
        x_T = noise.initial()
        ref = reference_sampling(model, sched, x_T, clipping=clip, noise_fn=lambda _x, noise=noise: noise.next())
        got = sample(model, sched, seeds[:8], shape, SamplerOptions("ancestral", clip=clip), device=device)
        agree["clip" if clip else "noclip"] = float((ref - got).abs().max())

    print(
        f"[sampler-vs-reference] {args.preset}@{args.image_size}, batch {args.batch}, {n} steps, "
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
        base = timings[f"reference|{mode}"]
        for label in ("sample", "sample+channels_last", "sample+compile"):
            if f"{label}|{mode}" in timings:
                ours_t = timings[f"{label}|{mode}"]
                ratios[f"{label}_vs_reference|{mode}"] = paired_speedup(base.times, ours_t.times)
                cpu_ratios[f"{label}_vs_reference|{mode}"] = paired_speedup(base.cpu_times, ours_t.cpu_times)
    result = {
        "meta": meta(args, device, device_name(device), None),
        "steps": n,
        "batch": args.batch,
        "rounds": args.repeats,
        "loops": rows,
        "ratios": ratios,
        "ratios_cpu_time": cpu_ratios,
        "goals": {"clip": 1.9, "noclip": 1.1},
        "max_abs_diff_reference_vs_sample_same_noise": agree,
    }
    print(f"{'loop':34s} {'s/step':>9s} {'cpu s/step':>10s} {'evals/step':>10s}")
    for name, r in rows.items():
        ev = r["model_evals_per_step"]
        print(f"{name:34s} {r['step_s']:9.4f} {r['cpu_step_s']:10.4f} {ev if ev is not None else '':>10}")
    for k, v in ratios.items():
        goal = result["goals"][k.split("|")[1]]
        print(f"{k:40s} {v:6.2f}x wall, {cpu_ratios[k]:6.2f}x cpu time  (goal >= {goal}x)")
    print(f"same noise, reference loop vs sample: max |diff| {agree}")
    write_json(args, result)
    return result
