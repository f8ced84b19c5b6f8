"""Small training states and batches shared by the tests of pipeline/train."""

from __future__ import annotations

import torch

from pipeline.ddpm.schedule import NoiseSchedule
from pipeline.ddpm.unet import preset
from pipeline.train.state import OptimConfig, TrainState


def tiny_state(seed=0, rank=0, *, device="cpu", skip_on_host=None, **optim) -> TrainState:
    return TrainState(
        preset("tiny", image_size=8, in_channels=1),
        NoiseSchedule("linear", 100),
        OptimConfig(**{"lr": 1e-3, "warmup_images": 256} | optim),
        device=device,
        seed=seed,
        rank=rank,
        skip_on_host=skip_on_host,
    )


def batch(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.rand(16, 1, 8, 8, generator=g) * 2 - 1


class Position:
    """Stands in for the data reader's position (the reader itself is tested in tests/unit/data)."""

    def __init__(self):
        self.state = {"epoch": 0, "batch": 0}

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, s):
        self.state = dict(s)
