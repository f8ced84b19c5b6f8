"""Printing and saving the benchmarks' results: run metadata, the tables, the JSON file."""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch


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


# -- several runs in one table ------------------------------------------------------------------------------


def summarize(paths: list[Path]) -> str:
    """A markdown table of the model runs in ``paths``: every variant's images/s, its paired ratio to the fp32
    eager baseline of its own run, its fraction of the bf16 peak, and the goals against the best variant."""
    runs = [(p.name, json.loads(p.read_text())) for p in paths if p.exists() and p.stat().st_size]
    lines = ["| run | section | variant | images/s | vs fp32 eager | of bf16 peak | first call s |", "|---" * 7 + "|"]
    best: dict[str, tuple[float, str]] = {}
    goals: dict[str, float] = {}
    applies = bool(runs) and all(d.get("goals_apply") for _, d in runs)
    for name, d in runs:
        for key, g in d.get("goals", {}).items():
            goals[key] = g["goal"]
        for section, metric, goal_key in (
            ("train", "images_per_s", "train_images_per_s"),
            ("sample", "ancestral_1000_images_per_s", "ancestral_1000_images_per_s"),
        ):
            for variant, r in d.get(section, {}).get("variants", {}).items():
                ratio = r.get("speedup_vs_fp32")
                first = r.get("first_call_s")
                if section == "sample":
                    ratio, first = (ratio or {}).get("ancestral"), (first or {}).get("ancestral")
                label = "training" if section == "train" else "ancestral-1000"
                first_s = "-" if first is None else f"{first:.1f}"
                lines.append(
                    f"| {name} | {label} | {variant} | {r[metric]:.1f} | {_x(ratio)} | {_frac(r)} | {first_s} |"
                )
                if r[metric] > best.get(goal_key, (-1.0, ""))[0]:
                    best[goal_key] = (r[metric], f"{variant} ({name})")
            for variant, why in d.get(section, {}).get("failed", {}).items():
                lines.append(f"| {name} | {section} | {variant} | FAILED: {why} | | | |")
    lines.append("")
    for key, goal in goals.items():
        value, where = best.get(key, (None, "-"))
        verdict = "no figure" if value is None else ("met" if value >= goal else "NOT met")
        if not applies:
            verdict = "not applicable (the goals are for the cifar preset at 32x32 on CUDA)"
        lines.append(f"- {key} >= {goal:g}: best {'-' if value is None else f'{value:.1f}'}, {where}: {verdict}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m benchmarks.report RUN.json ... > summary.md
    print(summarize([Path(p) for p in sys.argv[1:]]), end="")
