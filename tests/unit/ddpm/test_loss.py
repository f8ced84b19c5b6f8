"""The loss of Algorithm 1 and its Min-SNR-gamma weighting, pinned to closed forms."""

from __future__ import annotations

import pytest
import torch

from pipeline.ddpm.loss import diffusion_loss, snr_weight
from pipeline.ddpm.schedule import NoiseSchedule

GAMMA = 5.0


def _snr64(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    a = schedule.alphas_cumprod[t]  # float64
    return a / (1 - a)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_min_snr_weights_are_the_closed_forms(kind):
    s = NoiseSchedule(kind, 1000)
    t = torch.arange(1000)
    snr = _snr64(s, t)
    expected = {
        "x0": torch.minimum(snr, torch.tensor(GAMMA, dtype=torch.float64)),
        "eps": torch.minimum(snr, torch.tensor(GAMMA, dtype=torch.float64)) / snr,
        "v": torch.minimum(snr, torch.tensor(GAMMA, dtype=torch.float64)) / (snr + 1),
    }
    for objective, want in expected.items():
        got = snr_weight(s, t, objective, GAMMA).double()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-12), objective
    # Where SNR <= gamma, eps is weighted 1 (plain L_simple); the high-SNR end is down-weighted.
    w = snr_weight(s, t, "eps", GAMMA)
    assert torch.all(w[snr <= GAMMA] == 1) and w[0] < 1e-2


class _Fixed(torch.nn.Module):
    """A 'network' that returns a fixed output whatever its input: the loss's maths alone is tested."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x, t):
        return self.out


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_min_snr_loss_is_the_capped_snr_times_the_x0_error_for_every_objective(objective):
    """Hang et al. 2023, sec. 3.4: each objective's weighted loss is min(SNR, gamma) ||x0_hat - x0||^2."""
    s = NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (64,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    out = torch.randn(x0.shape, generator=g)
    loss = diffusion_loss(_Fixed(out), s, x0, objective=objective, draws=(t, noise), weighting="min_snr")
    x_t = s.add_noise(x0, noise, t)
    x0_hat = s.predict_x0(out, x_t, t, objective)
    want = _snr64(s, t).clamp(max=GAMMA) * (x0_hat - x0).double().pow(2).flatten(1).mean(1)
    assert torch.allclose(loss.per_sample.double(), want, rtol=1e-3, atol=1e-6)
    uniform = diffusion_loss(_Fixed(out), s, x0, objective=objective, draws=(t, noise))
    target = {"eps": noise, "x0": x0, "v": s.velocity(x0, noise, t)}[objective]
    assert torch.allclose(uniform.per_sample, (out - target).pow(2).flatten(1).mean(1))


def test_bad_weighting_and_gamma_are_named():
    s = NoiseSchedule("linear", 10)
    x0 = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="loss weighting 'snr'"):
        diffusion_loss(_Fixed(torch.zeros_like(x0)), s, x0, weighting="snr")
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
        snr_weight(s, torch.tensor([1]), "eps", 0.0)
