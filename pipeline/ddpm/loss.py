"""Training loss, Algorithm 1 of DDPM: a small function of (model, x0), as in NVlabs/edm's loss.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pipeline.ddpm.schedule import NoiseSchedule, Objective

Weighting = Literal["uniform", "min_snr"]


@dataclass
class LossOutput:
    """Per-sample losses and the timestep indices they were drawn at (for per-bucket logging)."""

    per_sample: torch.Tensor  # (B,), float32
    t: torch.Tensor  # (B,), long, 0-based (see schedule.py)

    @property
    def mean(self) -> torch.Tensor:
        return self.per_sample.mean()


def diffusion_loss(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    *,
    objective: Objective = "eps",
    generator: torch.Generator | None = None,
    draws: tuple[torch.Tensor, torch.Tensor] | None = None,
    weighting: Weighting = "uniform",
    min_snr_gamma: float = 5.0,
) -> LossOutput:
    """t ~ Uniform{1..T}, eps ~ N(0, I); MSE between the target and the model's output at x_t.

    The eps objective is DDPM eq. 14 (L_simple). The x0 and v objectives
    regress the clean image and the velocity instead; all use the same x_t.
    ``draws``: (t, eps) drawn beforehand (``draw_noise``) instead of from ``generator``.
    ``weighting``: "uniform" weighs every t alike; "min_snr" multiplies each sample's MSE by
    ``snr_weight`` (Min-SNR-gamma).
    """
    t, noise = draws if draws is not None else draw_noise(schedule, x0.shape, x0.device, x0.dtype, generator)
    x_t = schedule.add_noise(x0, noise, t)
    out = model(x_t, t)
    if objective == "eps":
        target = noise
    elif objective == "x0":
        target = x0
    elif objective == "v":
        target = schedule.velocity(x0, noise, t)
    else:
        raise ValueError(f"unknown objective {objective!r}; expected 'eps', 'x0' or 'v'")
    per_sample = (out.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if weighting == "min_snr":
        per_sample = per_sample * snr_weight(schedule, t, objective, min_snr_gamma)
    elif weighting != "uniform":
        raise ValueError(f"unknown loss weighting {weighting!r}; expected 'uniform' or 'min_snr'")
    return LossOutput(per_sample=per_sample, t=t)


def snr_weight(schedule: NoiseSchedule, t: torch.Tensor, objective: Objective, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (B,) for timestep indices ``t`` (Hang et al. 2023, "Efficient
    Diffusion Training via Min-SNR Weighting Strategy", section 3.4).

    The weight on the x0-space error ||x0_hat - x0||^2 is min(SNR_t, gamma). Written in each
    objective's own error, with SNR = alpha-bar / (1 - alpha-bar):
      x0:  ||x0_hat - x0||^2  -> min(SNR, gamma)
      eps: ||eps_hat - eps||^2 = SNR ||x0_hat - x0||^2  -> min(SNR, gamma) / SNR = min(1, gamma / SNR)
      v:   ||v_hat - v||^2 = (SNR + 1) ||x0_hat - x0||^2  -> min(SNR, gamma) / (SNR + 1)
    The eps form is written min(1, gamma / SNR) so that SNR = 0 (a cosine schedule's last step) gives 1.
    """
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
    snr = schedule._coef("signal_to_noise", t, torch.empty(0, device=t.device)).view(-1)  # (B,), float32
    if objective == "x0":
        return snr.clamp(max=gamma)
    if objective == "eps":
        return (gamma / snr).clamp(max=1.0)
    if objective == "v":
        return snr.clamp(max=gamma) / (snr + 1.0)
    raise ValueError(f"unknown objective {objective!r}; expected 'eps', 'x0' or 'v'")


def draw_noise(
    schedule: NoiseSchedule,
    shape: torch.Size | tuple[int, ...],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The timesteps (B,) and noise (B, C, H, W) of Algorithm 1 for a batch of ``shape``."""
    t = torch.randint(0, schedule.num_timesteps, (shape[0],), device=device, generator=generator)
    noise = torch.randn(shape, device=device, dtype=dtype, generator=generator)
    return t, noise
