"""The reference sampler that ``pipeline.ddpm.sampler.sample`` is measured against.

A straightforward per-step Python loop for Algorithm 2 (fixed-small variance), written the way DDPM
tutorials write it: every coefficient gathered per step from a 1-based table on the CPU and moved
to the batch's device, the square root of the posterior variance taken per step, ``t[0].item()`` to
find the last step, and with clipping two model evaluations per step (one for the x_0
reconstruction, eq. 4 inverted; one for the eps-form mean, eq. 11, which such loops compute on every
step). Its maths is right (with clipping it returns the clipped posterior mean, eq. 7), so given the
same noise it gives the same images as ``sample``: the comparison is like for like.

torch only: it runs on a bare GPU box.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pipeline.ddpm.schedule import NoiseSchedule

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def reference_tables(schedule: NoiseSchedule) -> dict[str, torch.Tensor]:
    """The per-timestep tables as float32 CPU tensors, indexed by the paper's 1-based t.

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


def gather_t(table: torch.Tensor, timesteps: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    """One coefficient per image, reshaped to broadcast over x, moved to the batch's device."""
    batch_size = timesteps.shape[0]
    sampled = table.gather(-1, timesteps.cpu())
    sampled = torch.reshape(sampled, (batch_size,) + (1,) * (len(x_shape) - 1))
    return sampled.to(timesteps.device)


@torch.no_grad()
def reference_step(
    model: Model,
    x_t: torch.Tensor,
    t: torch.Tensor,
    tables: dict[str, torch.Tensor],
    clipping: bool = True,
    noise_fn: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
) -> torch.Tensor:
    """x_{t-1} from x_t, ``t`` 1-based (the paper's). The model takes 0-based indices, hence ``t - 1``."""
    betas_t = gather_t(tables["betas_t"], t, x_t.shape)
    sqrt_1_minus_alphas_bar_t = gather_t(tables["sqrt_1_minus_alphas_bar_t"], t, x_t.shape)
    one_over_sqrt_alphas_t = gather_t(tables["one_over_sqrt_alphas_t"], t, x_t.shape)

    clipped_mean = None
    if clipping:
        sqrt_alphas_bar_t = gather_t(tables["sqrt_alphas_bar_t"], t, x_t.shape)
        sqrt_alphas_bar_t_minus_1 = gather_t(tables["sqrt_alphas_bar_t_minus_1"], t, x_t.shape)
        alphas_bar_t = gather_t(tables["alphas_bar_t"], t, x_t.shape)
        sqrt_alphas_t = gather_t(tables["sqrt_alphas_t"], t, x_t.shape)
        alphas_bar_t_minus_1 = gather_t(tables["alphas_bar_t_minus_1"], t, x_t.shape)

        x0_reconstruct = 1 / sqrt_alphas_bar_t * (x_t - sqrt_1_minus_alphas_bar_t * model(x_t, t - 1))  # eval 1
        x0_reconstruct = torch.clip(x0_reconstruct, -1.0, 1.0)
        clipped_mean = (sqrt_alphas_bar_t_minus_1 * betas_t) / (1 - alphas_bar_t) * x0_reconstruct + (
            sqrt_alphas_t * (1 - alphas_bar_t_minus_1)
        ) / (1 - alphas_bar_t) * x_t

    # The eps-form mean is computed on every step, so with clipping this is the second model evaluation.
    predicted_mean = one_over_sqrt_alphas_t * (x_t - betas_t / sqrt_1_minus_alphas_bar_t * model(x_t, t - 1))
    if clipped_mean is not None:
        predicted_mean = clipped_mean

    if t[0].item() == 1:
        return predicted_mean
    posterior_variance = gather_t(tables["posterior_variance"], t, x_t.shape)
    return predicted_mean + torch.sqrt(posterior_variance) * noise_fn(x_t)


@torch.no_grad()
def reference_sampling(
    model: Model,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    *,
    clipping: bool = True,
    noise_fn: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    tables: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Algorithm 2 from the given x_T, one ``reference_step`` per timestep T..1.

    Each z is ``torch.randn_like(x_t)`` unless ``noise_fn`` replaces it (tests feed it the per-seed
    streams of ``SeededNoise`` to compare with ``sample``).
    """
    tables = tables if tables is not None else reference_tables(schedule)
    batch = x_T.shape[0]
    images = x_T
    for timestep in range(schedule.num_timesteps, 0, -1):
        t = torch.full((batch,), timestep, device=x_T.device, dtype=torch.long)
        images = reference_step(model, images, t, tables, clipping=clipping, noise_fn=noise_fn)
    return images.clamp(-1.0, 1.0)
