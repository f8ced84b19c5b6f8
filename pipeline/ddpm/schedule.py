"""The DDPM noise schedule: a small pure object with no model inside.

Time convention, used everywhere in this package: ``t`` is a 0-based index, ``t = 0 .. T-1``,
and index ``t`` stands for the paper's timestep ``t + 1``. So ``betas[0]`` is the paper's beta_1,
``alphas_cumprod[t]`` is alpha-bar_{t+1}, and ``alphas_cumprod_prev[0] = 1`` is alpha-bar_0 (x_0 is
the clean image). Sampling walks ``t = T-1 .. 0``; the step at ``t = 0`` (the paper's t = 1) is the
last one and adds no noise (Algorithm 2, line 3).

Equation numbers are Ho et al. 2020 ("DDPM").
Schedule tensors are computed once in float64; coefficients are cast to the data's dtype and
device when gathered, and those casts are cached so the sampling loop does not repeat them.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

ScheduleKind = Literal["linear", "cosine"]
Variance = Literal["fixed_small", "fixed_large"]
Objective = Literal["eps", "x0", "v"]


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """DDPM section 4: betas rise linearly from beta_1 to beta_T."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha-bar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2).

    betas = 1 - alpha-bar_t / alpha-bar_{t-1}, clipped at ``max_beta`` to avoid the singularity at t = T.
    """
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=max_beta)


class NoiseSchedule:
    """Forward-process coefficients, ``add_noise`` for training and ``step``/``ddim_step`` for sampling."""

    def __init__(
        self,
        kind: ScheduleKind = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        cosine_s: float = 0.008,
    ) -> None:
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
        if kind == "linear":
            if not 0 < beta_start < beta_end < 1:
                raise ValueError(f"need 0 < beta_start < beta_end < 1, got {beta_start=} {beta_end=}")
            betas = linear_betas(num_timesteps, beta_start, beta_end)
        elif kind == "cosine":
            betas = cosine_betas(num_timesteps, cosine_s)
        else:
            raise ValueError(f"unknown schedule kind {kind!r}; expected 'linear' or 'cosine'")
        self.kind, self.num_timesteps = kind, num_timesteps
        self.beta_start, self.beta_end, self.cosine_s = beta_start, beta_end, cosine_s

        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # alpha-bar_0 = 1: x_0 is noise-free.
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        self.signal_to_noise = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        # beta-tilde_t (DDPM eq. 7) is a variance: the sampler takes its sqrt.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta-tilde_1 = 0, so its log is clipped to beta-tilde_2's, as in the DDPM reference code.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        # Posterior mean mu-tilde(x_t, x_0) = coef_x0 * x_0 + coef_xt * x_t (DDPM eq. 7).
        self.posterior_mean_coef_x0 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef_xt = (
            (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        )
        self._cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    # -- gathering ---------------------------------------------------------------------------------
    def _coef(self, name: str, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """``name[t]`` cast to ``like``'s device/dtype and shaped to broadcast over an image batch."""
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        key = (name, like.device, dtype)
        table = self._cache.get(key)
        if table is None:
            table = getattr(self, name).to(device=like.device, dtype=dtype)
            self._cache[key] = table
        if isinstance(t, int):
            return table[t]
        return table[t.to(like.device)].view(-1, *([1] * (like.dim() - 1)))

    def _check_t(self, t: torch.Tensor | int) -> None:
        tmin, tmax = (t, t) if isinstance(t, int) else (int(t.min()), int(t.max()))
        if tmin < 0 or tmax >= self.num_timesteps:
            raise ValueError(f"timestep index out of range [0, {self.num_timesteps - 1}]: {tmin}..{tmax}")

    # -- forward process ---------------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) = N(sqrt(alpha-bar_t) x_0, (1 - alpha-bar_t) I) (DDPM eq. 4)."""
        return (
            self._coef("sqrt_alphas_cumprod", t, x0) * x0 + self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(alpha-bar) eps - sqrt(1 - alpha-bar) x_0 (Salimans & Ho 2022, section 4)."""
        return (
            self._coef("sqrt_alphas_cumprod", t, x0) * noise - self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * x0
        )

    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio alpha-bar_t / (1 - alpha-bar_t) per timestep."""
        return self.signal_to_noise

    # -- converting a model output -------------------------------------------------------------------
    def predict_x0_from_eps(self, x_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """Invert eq. 4 for x_0: x_0 = (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t)."""
        return (
            self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._coef("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_eps_from_x0(self, x_t: torch.Tensor, t, x0: torch.Tensor) -> torch.Tensor:
        return (self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / self._coef(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    def predict_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t, objective: Objective) -> torch.Tensor:
        """x0_pred from the network's output under the chosen training objective."""
        if objective == "eps":
            return self.predict_x0_from_eps(x_t, t, model_output)
        if objective == "x0":
            return model_output
        if objective == "v":
            a, s = self._coef("sqrt_alphas_cumprod", t, x_t), self._coef("sqrt_one_minus_alphas_cumprod", t, x_t)
            return a * x_t - s * model_output
        raise ValueError(f"unknown objective {objective!r}; expected 'eps', 'x0' or 'v'")

    def split_prediction(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t, objective: Objective
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_pred, eps_pred) from the network's output under the chosen training objective."""
        x0 = self.predict_x0(model_output, x_t, t, objective)
        if objective == "eps":
            return x0, model_output
        if objective == "x0":
            return x0, self.predict_eps_from_x0(x_t, t, x0)
        a, s = self._coef("sqrt_alphas_cumprod", t, x_t), self._coef("sqrt_one_minus_alphas_cumprod", t, x_t)
        return x0, s * x_t + a * model_output

    # -- reverse process -----------------------------------------------------------------------------
    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """mu-tilde_t(x_t, x_0) (DDPM eq. 7)."""
        return self._coef("posterior_mean_coef_x0", t, x_t) * x0 + self._coef("posterior_mean_coef_xt", t, x_t) * x_t

    def posterior_mean_from_eps(self, x_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """mu_theta = (x_t - beta_t / sqrt(1 - alpha-bar_t) eps) / sqrt(alpha_t) (DDPM eq. 11)."""
        coef = self._coef("betas", t, x_t) / self._coef("sqrt_one_minus_alphas_cumprod", t, x_t)
        return (x_t - coef * eps) / self._coef("alphas", t, x_t).sqrt()

    def sigma(self, t, like: torch.Tensor, variance: Variance) -> torch.Tensor:
        """Standard deviation of p(x_{t-1} | x_t): sqrt(beta_t) or sqrt(beta-tilde_t) (DDPM section 3.2).

        The paper's sigma_t^2 is a variance; sampling needs its square root.
        """
        if variance == "fixed_small":
            return self._coef("posterior_variance", t, like).sqrt()
        if variance == "fixed_large":
            return self._coef("betas", t, like).sqrt()
        raise ValueError(f"unknown variance {variance!r}; expected 'fixed_small' or 'fixed_large'")

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        x_t: torch.Tensor,
        noise: torch.Tensor | None,
        *,
        objective: Objective = "eps",
        variance: Variance = "fixed_small",
        clip: bool = False,
    ) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1} (Algorithm 2, line 4), from ONE model output.

        With ``clip`` the predicted x_0 is clipped to [-1, 1] and the mean is the posterior mean
        eq. 1.6.4 at that x_0; without it the mean is the eps-form eq. 11. Both are equal while the
        predicted x_0 lies inside [-1, 1]. At ``t == 0`` (the paper's t = 1) no noise is added.
        """
        self._check_t(t)
        if objective == "eps" and not clip:  # the eps-form needs no x_0 (this is the sampling hot path)
            mean = self.posterior_mean_from_eps(x_t, t, model_output)
        else:
            x0_pred = self.predict_x0(model_output, x_t, t, objective)
            mean = self.posterior_mean(x0_pred.clamp(-1.0, 1.0) if clip else x0_pred, x_t, t)
        if t == 0 or noise is None:
            return mean
        return mean + self.sigma(t, x_t, variance) * noise

    def ddim_step(
        self,
        model_output: torch.Tensor,
        t: int,
        t_prev: int,
        x_t: torch.Tensor,
        noise: torch.Tensor | None,
        *,
        eta: float = 0.0,
        objective: Objective = "eps",
        clip: bool = False,
    ) -> torch.Tensor:
        """One DDIM step from index t to t_prev < t (Song et al. 2021, eq. 12; t_prev = -1 means x_0).

        sigma = eta * sqrt((1 - a_prev)/(1 - a_t)) * sqrt(1 - a_t/a_prev); eta = 0 is deterministic,
        eta = 1 with every step is the DDPM fixed-small sampler.
        """
        self._check_t(t)
        if clip:  # eps is recomputed from the clipped x_0, so the split's eps would be wasted
            x0_pred = self.predict_x0(model_output, x_t, t, objective).clamp(-1.0, 1.0)
            eps_pred = self.predict_eps_from_x0(x_t, t, x0_pred)
        else:
            x0_pred, eps_pred = self.split_prediction(model_output, x_t, t, objective)
        a_t = self._coef("alphas_cumprod", t, x_t)
        a_prev = self._coef("alphas_cumprod", t_prev, x_t) if t_prev >= 0 else torch.ones_like(a_t)
        sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
        x_prev = a_prev.sqrt() * x0_pred + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps_pred
        if eta > 0 and t_prev >= 0 and noise is not None:
            x_prev = x_prev + sigma * noise
        return x_prev

    # -- (de)serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form: enough to rebuild the schedule (e.g. from a checkpoint) and to log it."""
        return {
            "kind": self.kind,
            "num_timesteps": self.num_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "cosine_s": self.cosine_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NoiseSchedule:
        known = {"kind", "num_timesteps", "beta_start", "beta_end", "cosine_s"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"cannot rebuild NoiseSchedule: unknown keys {sorted(unknown)}")
        return cls(**d)

    def curves(self) -> dict[str, list[float]]:
        """beta_t, alpha-bar_t and log-SNR per timestep, for logging and plotting."""
        return {
            "beta": self.betas.tolist(),
            "alpha_bar": self.alphas_cumprod.tolist(),
            "log_snr": self.snr().log().tolist(),
        }

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.to_dict()})"
