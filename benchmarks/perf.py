"""Performance helpers for benchmarks/bench.py and tests/test_perf.py: timing, FLOP counting, device peaks,
and a seed-000-style sampling loop used as the baseline of issue 2's measurement.

torch (and numpy) only: this module must import on a bare GPU box without Ray, MLflow or pydantic.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.ddpm.schedule import NoiseSchedule

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


# -- the seed-000-style sampling loop (issue 2's baseline) ---------------------------------------------------


def seed_tables(schedule: NoiseSchedule) -> dict[str, torch.Tensor]:
    """The per-timestep tables of seed 000 as float32 CPU tensors, indexed by the paper's 1-based t.

    Entry 0 is padding (alpha-bar_0 = 1), so ``table[t]`` is the paper's value at step t = 1..T.
    """
    pad1 = lambda v: torch.cat([torch.ones(1, dtype=torch.float64), v]).float()
    pad0 = lambda v: torch.cat([torch.zeros(1, dtype=torch.float64), v]).float()
    betas, alphas, ab = schedule.betas, schedule.alphas, schedule.alphas_cumprod
    ab_prev = schedule.alphas_cumprod_prev
    return {
        "betas_t": pad0(betas),
        "sqrt_1_minus_alphas_bar_t": pad0((1 - ab).sqrt()),
        "one_over_sqrt_alphas_t": pad1(1 / alphas.sqrt()),
        "sqrt_alphas_bar_t": pad1(ab.sqrt()),
        "sqrt_alphas_bar_t_minus_1": pad1(ab_prev.sqrt()),
        "alphas_bar_t": pad1(ab),
        "sqrt_alphas_t": pad1(alphas.sqrt()),
        "alphas_bar_t_minus_1": pad1(ab_prev),
        "posterior_variance": pad0(schedule.posterior_variance),
    }


def sample_by_t(tensor_to_sample: torch.Tensor, timesteps: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    """Seed 000's gather: one coefficient per image, reshaped to broadcast, moved to the batch's device."""
    batch_size = timesteps.shape[0]
    sampled_tensor = tensor_to_sample.gather(-1, timesteps.cpu())
    sampled_tensor = torch.reshape(sampled_tensor, (batch_size,) + (1,) * (len(x_shape) - 1))
    return sampled_tensor.to(timesteps.device)


@torch.no_grad()
def seed_sample_p(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_t: torch.Tensor,
    t: torch.Tensor,
    tables: dict[str, torch.Tensor],
    clipping: bool = True,
    noise_fn: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
) -> torch.Tensor:
    """Seed 000's ``sample_p``: x_{t-1} from x_t, ``t`` 1-based (the paper's), with the maths corrected.

    As in the seed: every coefficient is gathered per step with ``sample_by_t``, the square root of
    the posterior variance is taken per step, and with ``clipping`` the model is evaluated twice (once
    for the x_0 reconstruction, once in the eps-form mean the seed computes on every step). The seed
    then returns that eps-form mean, discarding the clipped one; here the clipped mean is returned
    (the correct maths), so both modes give the same images as ``pipeline.ddpm.sampler.sample``.
    The model takes 0-based timestep indices (schedule.py), hence ``t - 1``.
    """
    betas_t_sampled = sample_by_t(tables["betas_t"], t, x_t.shape)
    sqrt_1_minus_alphas_bar_t_sampled = sample_by_t(tables["sqrt_1_minus_alphas_bar_t"], t, x_t.shape)
    one_over_sqrt_alphas_t_sampled = sample_by_t(tables["one_over_sqrt_alphas_t"], t, x_t.shape)

    clipped_mean = None
    if clipping:
        sqrt_alphas_bar_t_sampled = sample_by_t(tables["sqrt_alphas_bar_t"], t, x_t.shape)
        sqrt_alphas_bar_t_minus_1_sampled = sample_by_t(tables["sqrt_alphas_bar_t_minus_1"], t, x_t.shape)
        alphas_bar_t_sampled = sample_by_t(tables["alphas_bar_t"], t, x_t.shape)
        sqrt_alphas_t_sampled = sample_by_t(tables["sqrt_alphas_t"], t, x_t.shape)
        alphas_bar_t_minus_1_sampled = sample_by_t(tables["alphas_bar_t_minus_1"], t, x_t.shape)

        x0_reconstruct = (
            1 / sqrt_alphas_bar_t_sampled * (x_t - sqrt_1_minus_alphas_bar_t_sampled * model(x_t, t - 1))
        )  # model evaluation 1
        x0_reconstruct = torch.clip(x0_reconstruct, -1.0, 1.0)
        clipped_mean = (sqrt_alphas_bar_t_minus_1_sampled * betas_t_sampled) / (
            1 - alphas_bar_t_sampled
        ) * x0_reconstruct + (sqrt_alphas_t_sampled * (1 - alphas_bar_t_minus_1_sampled)) / (
            1 - alphas_bar_t_sampled
        ) * x_t

    # Model evaluation 2 with clipping (the only one without): the seed computes this mean every step.
    predicted_mean = one_over_sqrt_alphas_t_sampled * (
        x_t - betas_t_sampled / sqrt_1_minus_alphas_bar_t_sampled * model(x_t, t - 1)
    )
    if clipped_mean is not None:
        predicted_mean = clipped_mean

    if t[0].item() == 1:
        return predicted_mean
    posterior_variance_sampled = sample_by_t(tables["posterior_variance"], t, x_t.shape)
    noise = noise_fn(x_t)
    return predicted_mean + torch.sqrt(posterior_variance_sampled) * noise


@torch.no_grad()
def seed_sampling(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    *,
    clipping: bool = True,
    noise_fn: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    tables: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Seed 000's ``sampling`` loop (Algorithm 2, fixed-small variance) from the given x_T.

    The seed draws x_T with ``torch.randn`` and each z with ``torch.randn_like``; ``noise_fn``
    replaces the latter (tests feed it the per-seed streams to compare with ``sample``).
    """
    tables = tables if tables is not None else seed_tables(schedule)
    batch = x_T.shape[0]
    images = x_T
    for timestep in range(schedule.num_timesteps, 0, -1):
        t = torch.full((batch,), timestep, device=x_T.device, dtype=torch.long)
        images = seed_sample_p(model, images, t, tables, clipping=clipping, noise_fn=noise_fn)
    return images.clamp(-1.0, 1.0)
