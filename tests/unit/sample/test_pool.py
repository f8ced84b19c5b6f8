"""Seed batches and fixed-shape model calls of the sampling pool (in process, no Ray)."""

from __future__ import annotations

import pytest
import torch

from pipeline.ddpm.sampler import SamplerOptions, sample
from pipeline.ddpm.schedule import NoiseSchedule
from pipeline.ddpm.unet import UNet, preset
from pipeline.sample.pool import FixedShapeCalls, make_batches, start_sampling


def test_batches_cover_every_seed_once():
    batches = make_batches(1000, 23, 5)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert [s for b in batches for s in b.seeds] == list(range(1000, 1023))
    assert [b.start for b in batches] == [0, 5, 10, 15, 20]


def test_fixed_shape_calls_make_images_independent_of_the_batch():
    """Plain batched U-Net calls differ at ~1e-6 between batch sizes; calls of one fixed shape do not."""
    torch.manual_seed(0)
    model = UNet(preset("tiny", image_size=8, in_channels=1)).eval()
    for p in model.parameters():  # the zero-initialised output conv would make every prediction 0
        p.data.add_(0.05 * torch.randn_like(p))
    sched = NoiseSchedule("linear", 100, 1e-3, 0.2)
    opts, seeds = SamplerOptions("ddim", steps=10), list(range(10))
    call = FixedShapeCalls(model, 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = sample(call, sched, seeds, (1, 8, 8), opts)
        for bs in (1, 3, 7):
            parts = [sample(call, sched, seeds[i : i + bs], (1, 8, 8), opts) for i in range(0, 10, bs)]
            assert torch.equal(torch.cat(parts), full), bs
    finally:
        torch.set_num_threads(threads)


def test_sampling_waits_for_every_actor_within_the_bound():
    assert not start_sampling(ready=1, starting=1, waited_s=10, timeout_s=300)  # a remote actor still starting
    assert start_sampling(ready=2, starting=0, waited_s=10, timeout_s=300)
    assert not start_sampling(ready=0, starting=2, waited_s=299, timeout_s=300)
    assert start_sampling(ready=1, starting=1, waited_s=301, timeout_s=300)  # the late one joins when it comes
    with pytest.raises(TimeoutError, match="no sampling actor started within 300 s"):
        start_sampling(ready=0, starting=2, waited_s=301, timeout_s=300)
