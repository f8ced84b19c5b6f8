"""The noise schedule pinned to closed forms (DDPM eqs. 4, 6-7, 11), not to the tutorials."""

import math

import numpy as np
import pytest
import torch

from pipeline.ddpm.schedule import NoiseSchedule


def test_linear_betas_and_alpha_bar_is_running_product():
    s = NoiseSchedule("linear", 1000, 1e-4, 0.02)
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(s.betas.numpy(), betas, rtol=1e-12)
    running, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        running.append(prod)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), running, rtol=1e-10)
    assert s.alphas_cumprod_prev[0] == 1.0
    np.testing.assert_allclose(s.alphas_cumprod_prev[1:].numpy(), running[:-1], rtol=1e-10)
    assert s.betas.dtype == torch.float64
    # The paper's alpha-bar_T is tiny: x_T is (almost) pure noise.
    assert s.alphas_cumprod[-1] < 1e-4


def test_cosine_schedule_matches_its_definition():
    T, sc = 1000, 0.008
    s = NoiseSchedule("cosine", T, cosine_s=sc)
    f = lambda t: math.cos((t / T + sc) / (1 + sc) * math.pi / 2) ** 2
    for t in (0, 10, 500, 900):  # index t is the paper's t + 1
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert s.betas.max() <= 0.999


def test_add_noise_matches_iterating_the_one_step_kernel():
    """q(x_t | x_0) in closed form (eq. 4) vs t applications of q(x_t | x_{t-1}) (eq. 2)."""
    s = NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    n, t = 40_000, 300
    x0 = torch.tensor([0.8, -0.5, 0.0], dtype=torch.float64).expand(n, 3)
    x = x0.clone()
    for i in range(t + 1):  # indices 0..t: the paper's steps 1..t+1
        b = s.betas[i]
        x = (1 - b).sqrt() * x + b.sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
    closed = s.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), torch.full((n,), t))
    ab = s.alphas_cumprod[t]
    for sample in (x, closed):
        se_mean = (1 - ab).sqrt() / math.sqrt(n)
        assert torch.all((sample.mean(0) - ab.sqrt() * x0[0]).abs() < 5 * se_mean)
        # The sample variance of n Gaussians has a relative standard error of sqrt(2/n).
        assert torch.all((sample.var(0) / (1 - ab) - 1).abs() < 5 * math.sqrt(2 / n))


def test_posterior_equals_gaussian_conditioning():
    """Eq. 6-7 from Bayes' rule on the joint Gaussian of (x_{t-1}, x_t) given x_0."""
    s = NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(1)
    for t in (1, 2, 50, 999):
        a, ab, ab_prev = s.alphas[t], s.alphas_cumprod[t], s.alphas_cumprod_prev[t]
        x0 = torch.randn(5, generator=g, dtype=torch.float64)
        xt = torch.randn(5, generator=g, dtype=torch.float64)
        # x_{t-1} ~ N(sqrt(ab_prev) x0, 1 - ab_prev); x_t = sqrt(a) x_{t-1} + sqrt(1 - a) z.
        cov = a.sqrt() * (1 - ab_prev)
        mean = ab_prev.sqrt() * x0 + cov / (1 - ab) * (xt - ab.sqrt() * x0)
        var = (1 - ab_prev) - cov**2 / (1 - ab)
        torch.testing.assert_close(s.posterior_mean(x0, xt, t), mean, rtol=1e-10, atol=1e-12)
        assert s.posterior_variance[t].item() == pytest.approx(var.item(), rel=1e-9)
        # beta-tilde_t (eq. 7) written out.
        assert s.posterior_variance[t].item() == pytest.approx(((1 - a) * (1 - ab_prev) / (1 - ab)).item(), rel=1e-12)
    assert s.posterior_variance[0] == 0.0  # x_0 given x_1 and x_0 is certain
    assert torch.isfinite(s.posterior_log_variance_clipped).all()


def test_eps_form_of_the_posterior_mean():
    """Eq. 11: mu(x_t, x_0(x_t, eps)) = (x_t - beta/sqrt(1-ab) eps)/sqrt(alpha)."""
    s = NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(2)
    for t in (0, 5, 500, 999):
        x0 = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        tt = torch.full((2,), t)
        xt = s.add_noise(x0, eps, tt)
        torch.testing.assert_close(s.predict_x0_from_eps(xt, tt, eps), x0)
        expected = (xt - s.betas[t] / (1 - s.alphas_cumprod[t]).sqrt() * eps) / s.alphas[t].sqrt()
        torch.testing.assert_close(s.posterior_mean_from_eps(xt, tt, eps), expected)
        torch.testing.assert_close(s.posterior_mean(x0, xt, tt), expected)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_objectives_round_trip(objective):
    s = NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    xt = s.add_noise(x0, eps, t)
    out = {"eps": eps, "x0": x0, "v": s.velocity(x0, eps, t)}[objective]
    x0_pred, eps_pred = s.split_prediction(out, xt, t, objective)
    torch.testing.assert_close(x0_pred, x0)
    torch.testing.assert_close(eps_pred, eps)


def test_step_clip_and_noclip_agree_inside_the_box_and_last_step_is_noiseless():
    s = NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(3, 1, 4, 4, generator=g) * 1.8 - 0.9  # inside [-1, 1]
    eps = torch.randn(x0.shape, generator=g)
    z = torch.randn(x0.shape, generator=g)
    for t in (0, 1, 100, 999):
        xt = s.add_noise(x0, eps, torch.full((3,), t))
        a = s.step(eps, t, xt, z, clip=True)
        b = s.step(eps, t, xt, z, clip=False)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    xt = s.add_noise(x0, eps, torch.zeros(3, dtype=torch.long))
    no_noise = s.step(eps, 0, xt, None)
    torch.testing.assert_close(s.step(eps, 0, xt, z * 100), no_noise)
    # sigma is a standard deviation: sqrt(beta-tilde) and sqrt(beta), not the variances.
    assert s.sigma(500, xt, "fixed_small").item() == pytest.approx(s.posterior_variance[500].sqrt().item(), rel=1e-6)
    assert s.sigma(500, xt, "fixed_large").item() == pytest.approx(s.betas[500].sqrt().item(), rel=1e-6)


def test_dict_round_trip_and_bad_values():
    for s in (NoiseSchedule("linear", 100, 1e-3, 0.05), NoiseSchedule("cosine", 50, cosine_s=0.01)):
        r = NoiseSchedule.from_dict(s.to_dict())
        assert r.to_dict() == s.to_dict()
        torch.testing.assert_close(r.alphas_cumprod, s.alphas_cumprod, rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_timesteps"):
        NoiseSchedule("linear", 1)
    with pytest.raises(ValueError, match="beta_start < beta_end"):
        NoiseSchedule("linear", 10, 0.02, 0.01)
    with pytest.raises(ValueError, match="unknown schedule"):
        NoiseSchedule("quadratic", 10)
    with pytest.raises(ValueError, match="unknown keys"):
        NoiseSchedule.from_dict({"kind": "linear", "gamma": 1})
    with pytest.raises(ValueError, match="out of range"):
        NoiseSchedule("linear", 10).step(torch.zeros(1, 1), 10, torch.zeros(1, 1), None)
