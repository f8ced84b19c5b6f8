"""A validation loss cheap enough to compute during training: the signal a sweep stops bad trials on.

The EMA model (the one that samples) denoises a fixed set: ``train.validate_images`` images of the eval
split, each noised at its own timestep and with its own noise, both drawn once from a fixed seed. So two
values of one run differ only by the weights, and two runs on one dataset see the same set.

The loss is the eps-space error of DDPM eq. 14 whatever the training objective and loss weighting:
the network's output is converted to its eps prediction (``split_prediction``), so runs trained on eps,
x0 or v, uniform or Min-SNR weighted, are ranked on one scale. The timesteps are stratified (evenly
spaced over 1..T) rather than drawn, which removes the timestep draw's variance from the estimate.

Every rank computes the same value on its own copy of the set (no collective), at the same step.
"""

from __future__ import annotations

import torch

from pipeline.config import Settings
from pipeline.data import load_split_arrays
from pipeline.train.state import TrainState

NOISE_SEED = 20_200_619  # fixed: the set must not depend on the run's seed, so runs are comparable


class Validator:
    def __init__(self, state: TrainState, settings: Settings) -> None:

        self.state, self.every = state, settings.train.validate_every_images
        self.last: float | None = None
        if not self.every:
            return
        n = settings.train.validate_images
        d = settings.data
        split = load_split_arrays(
            d.url,
            settings.storage,
            "eval",
            limit=n,
            image_size=d.image_size,
            channels=d.channels,
            resize="never" if d.resize == "never" else "center",  # a fixed set: no random crops
            label_key=d.label_key,
        )
        if len(split.images) == 0:
            raise ValueError(f"train.validate_every_images needs eval images; {settings.data.url} has none")
        images = torch.from_numpy(split.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, C, H, W)
        x0 = images[torch.arange(n) % len(images)]  # (n, C, H, W): the eval images repeated up to n
        T = state.schedule.num_timesteps
        t = torch.linspace(0, T - 1, n).round().long()  # (n,): stratified over the T steps
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(NOISE_SEED))  # (n, C, H, W)
        dev = state.device
        self.x_t = state.schedule.add_noise(x0, noise, t).to(dev)
        self.t, self.noise = t.to(dev), noise.to(dev)

    def due(self, before: int, after: int) -> bool:
        """Whether a validation falls in (before, after] images."""
        return bool(self.every) and before // self.every != after // self.every

    @torch.no_grad()
    def loss(self) -> float:
        """Mean squared eps error of the EMA model on the fixed set."""
        s, model = self.state, self.state.ema.model
        was_training = model.training
        model.eval()
        try:
            out = model(self.x_t, self.t).float()
            _, eps = s.schedule.split_prediction(out, self.x_t, self.t, s.cfg.objective)
            self.last = float((eps - self.noise).pow(2).mean())
        finally:
            model.train(was_training)
        return self.last
