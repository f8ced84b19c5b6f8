"""Training loss, Algorithm 1 of DDPM: a small function of (model, x0), as in NVlabs/edm's loss.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.ddpm.schedule import NoiseSchedule, Objective


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
) -> LossOutput:
    """t ~ Uniform{1..T}, eps ~ N(0, I); MSE between the target and the model's output at x_t.

    The eps objective is DDPM eq. 14 (L_simple). The x0 and v objectives
    regress the clean image and the velocity instead; all use the same x_t.
    ``draws``: (t, eps) drawn beforehand (``draw_noise``) instead of from ``generator``.
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
    return LossOutput(per_sample=per_sample, t=t)


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
