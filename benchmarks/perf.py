"""Measurement primitives of the benchmarks: device names and bf16 peaks, interleaved timing, FLOP counting.

torch only: this module must import on a bare GPU box without Ray, MLflow or pydantic.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets, matched in order
# against torch.cuda.get_device_name(): the first substring that occurs wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def peak_tflops(name: str) -> float | None:
    """The bf16 dense peak for a CUDA device name, or None when not in the table (e.g. a CPU)."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- timing --------------------------------------------------------------------------------------------


@dataclass
class Timing:
    first_call_s: float = float("nan")  # the first warm-up call (includes compilation, graph capture)
    times: list[float] = field(default_factory=list)  # wall-clock seconds, one per round
    cpu_times: list[float] = field(default_factory=list)  # this process's CPU seconds (all threads)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def interleaved(
    runners: dict[str, Callable[[], object]],
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
    errors: dict[str, str] | None = None,
) -> dict[str, Timing]:
    """Time each runner ``repeats`` times, interleaved round by round (the order rotates each round).

    A noisy machine slows every runner of a round alike, so ratios within a round are robust
    (``paired_speedup``). ``warmup`` untimed calls per runner come first; the first one is timed
    separately (compilation and graph capture happen there). With ``errors`` given, a runner that
    raises is dropped (its message recorded there) and the others go on; without, the error propagates.
    """
    names = list(runners)
    out = {n: Timing() for n in names}

    def call(n: str) -> tuple[float, float] | None:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            runners[n]()
            synchronize(device)
        except Exception as e:
            if errors is None:
                raise
            errors[n] = f"{type(e).__name__}: {e}"
            names.remove(n)
            out.pop(n)
            return None
        return time.perf_counter() - t0, time.process_time() - c0

    for w in range(warmup):
        for n in list(names):
            dt = call(n)
            if w == 0 and dt is not None:
                out[n].first_call_s = dt[0]
    for r in range(repeats):
        order = list(names)
        k = r % max(1, len(order))
        for n in order[k:] + order[:k]:
            if n in names:
                dt = call(n)
                if dt is not None:
                    out[n].times.append(dt[0])
                    out[n].cpu_times.append(dt[1])
    return out


def paired_speedup(base: Sequence[float], other: Sequence[float]) -> float:
    """Median over rounds of base_time / other_time (> 1: ``other`` is faster)."""
    return statistics.median(b / o for b, o in zip(base, other, strict=True))


# -- FLOPs -----------------------------------------------------------------------------------------------


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """FLOPs of the matmuls/convolutions/attention ``fn`` runs (torch's FlopCounterMode; 1 MAC = 2 FLOPs)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def model_flops(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> dict[str, object]:
    """Forward and forward+backward FLOPs per image of ``model(x, t)`` (counted on the batch of ``x``)."""
    b = x.shape[0]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        fwd, fwd_ops = count_flops(lambda: model(x, t))
    model.train(was_training)
    params = [p for p in model.parameters() if p.requires_grad]

    def fwd_bwd() -> None:
        model(x, t).float().pow(2).mean().backward()

    total, _ = count_flops(fwd_bwd)
    for p in params:
        p.grad = None
    return {
        "fwd_flops_per_image": fwd / b,
        "fwd_bwd_flops_per_image": total / b,
        "fwd_gmac_per_image": fwd / b / 2e9,
        "fwd_by_op_per_image": {k: v / b for k, v in fwd_ops.items()},
        "train_over_fwd": total / fwd if fwd else float("nan"),
    }


@torch.no_grad()
def perturb_(model: nn.Module, scale: float = 0.02, seed: int = 0) -> nn.Module:
    """Add N(0, scale^2) to every weight: the U-Net zero-initialises its output layers, so an untrained
    model predicts exactly 0 and every sampler variant would agree trivially."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
    return model
