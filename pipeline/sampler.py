"""Reverse-process sampling: Algorithm 2 (ancestral) and DDIM, with one model call per step.

Every image owns a random stream seeded by its own seed (as in NVlabs/edm's generate.py), so the
image for seed s is the same whatever batch it is drawn in and on however many workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from pipeline.schedule import NoiseSchedule, Objective, Variance

Method = Literal["ancestral", "ddim"]

# Noise is drawn per image in blocks of this many steps. It is part of the definition of an image's
# random stream: changing it changes every sample for a given seed.
NOISE_BLOCK = 16


class SeededNoise:
    """Per-image Gaussian streams: x_T first, then one z per noisy step, all from the image's seed.

    Drawing a block of steps per generator call keeps the Python overhead at B calls per
    NOISE_BLOCK steps instead of B calls per step.
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device: torch.device) -> None:
        self.shape, self.device = tuple(shape), torch.device(device)
        self.generators = []
        for s in seeds:
            g = torch.Generator(device=self.device)
            g.manual_seed(int(s))
            self.generators.append(g)
        self._block: torch.Tensor | None = None
        self._pos = NOISE_BLOCK

    def _draw(self, n: int) -> torch.Tensor:
        per_image = [torch.randn((n, *self.shape), generator=g, device=self.device) for g in self.generators]
        return torch.stack(per_image, dim=1)  # (n, B, C, H, W)

    def initial(self) -> torch.Tensor:
        return self._draw(1)[0]

    def next(self) -> torch.Tensor:
        if self._pos == NOISE_BLOCK:
            self._block, self._pos = self._draw(NOISE_BLOCK), 0
        z = self._block[self._pos]
        self._pos += 1
        return z


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` evenly spaced 0-based indices from T-1 down to 0 (both ends included)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"DDIM steps must be in [1, {num_timesteps}], got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    idx = np.linspace(0, num_timesteps - 1, steps).round().astype(int)
    return sorted(set(idx.tolist()), reverse=True)


@dataclass
class SamplerOptions:
    method: Method = "ancestral"
    steps: int | None = None  # DDIM: number of respaced steps (default 50); ancestral: always T
    eta: float = 0.0  # DDIM only
    variance: Variance = "fixed_small"  # ancestral only
    clip: bool = True
    objective: Objective = "eps"

    def model_evals(self, num_timesteps: int) -> int:
        if self.method == "ddim":
            return len(ddim_timesteps(num_timesteps, self.steps or 50))
        return num_timesteps


@torch.no_grad()
def sample(
    model: nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    seeds: Sequence[int],
    shape: Sequence[int],
    options: SamplerOptions | None = None,
    *,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Images for ``seeds`` (one per seed), shape (len(seeds), *shape), float32, clamped to [-1, 1]."""
    opts = options or SamplerOptions()
    device = torch.device(device)
    noise = SeededNoise(seeds, shape, device)
    x = noise.initial()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    b = x.shape[0]

    if opts.method == "ancestral":
        ts = list(range(schedule.num_timesteps - 1, -1, -1))
    elif opts.method == "ddim":
        ts = ddim_timesteps(schedule.num_timesteps, opts.steps or 50)
    else:
        raise ValueError(f"unknown sampling method {opts.method!r}; expected 'ancestral' or 'ddim'")

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ts), desc=f"sampling ({opts.method})", leave=False)
    t_batch = torch.empty(b, dtype=torch.long, device=device)
    for i, t in enumerate(ts):
        t_batch.fill_(t)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(x, t_batch)  # the one model evaluation of this step
        out = out.float()
        if opts.method == "ancestral":
            z = noise.next() if t > 0 else None
            x = schedule.step(out, t, x, z, objective=opts.objective, variance=opts.variance, clip=opts.clip)
        else:
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            z = noise.next() if (opts.eta > 0 and t_prev >= 0) else None
            x = schedule.ddim_step(out, t, t_prev, x, z, eta=opts.eta, objective=opts.objective, clip=opts.clip)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return x.float().clamp(-1.0, 1.0).contiguous()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float (B, C, H, W) -> uint8 (B, H, W, C)."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
