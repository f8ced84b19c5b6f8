"""The benchmarks' own machinery: the reference sampling loop, FLOP counting, the peak table, interleaved
timing. bench.py run as on a bare GPU box (subprocesses) is tests/integration/test_benchmarks_smoke.py (slow).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.perf import count_flops, interleaved, model_flops, paired_speedup, peak_tflops, perturb_
from benchmarks.reference import reference_sampling
from pipeline.ddpm.sampler import SamplerOptions, SeededNoise, sample
from pipeline.ddpm.schedule import NoiseSchedule
from pipeline.ddpm.unet import UNet, preset

SHAPE = (1, 8, 8)


def _tiny() -> UNet:
    """Weights perturbed: the zero-initialised output layers would make every sampler agree trivially."""
    torch.manual_seed(0)
    return perturb_(UNet(preset("tiny", image_size=8, in_channels=1)), 0.05, 0)


# -- the reference loop ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [True, False])
def test_reference_loop_equals_sample_given_the_same_noise(clip):
    """The loop sample() is measured against computes the same images: the comparison is like for like."""
    model = _tiny().eval()
    s = NoiseSchedule("linear", 25)
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    noise = SeededNoise(range(6), SHAPE, torch.device("cpu"))
    x_T = noise.initial()
    ref = reference_sampling(model, s, x_T, clipping=clip, noise_fn=lambda _x: noise.next())
    assert len(calls) == (2 if clip else 1) * 25  # the reference evaluates the model twice per clipped step
    calls.clear()
    got = sample(model, s, range(6), SHAPE, SamplerOptions("ancestral", clip=clip))
    assert len(calls) == 25
    handle.remove()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert not torch.equal(got[0], got[1])


# -- measurement helpers ----------------------------------------------------------------------------------


def test_flop_count_matches_the_paper_cifar_model():
    """The paper's CIFAR-10 model: 35.7M parameters, 6.05 GMAC of convolutions per 32x32 forward."""
    torch.manual_seed(0)
    model = UNet(preset("cifar", image_size=32, in_channels=3))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(35.7e6, rel=0.005)
    x, t = torch.randn(1, 3, 32, 32), torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        total, by_op = count_flops(lambda: model(x, t))
    assert by_op["aten.convolution"] / 2e9 == pytest.approx(6.05, rel=0.005)
    assert total / 1e9 == pytest.approx(12.44, rel=0.005)  # + attention (bmm) and the linear layers


def test_model_flops_training_is_about_three_forwards():
    f = model_flops(_tiny(), torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    assert 2.7 < f["train_over_fwd"] <= 3.0
    assert f["fwd_flops_per_image"] > 0


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("x86_64 CPU, 2 threads") is None


def test_interleaved_rounds_and_errors():
    calls: list[str] = []
    errors: dict[str, str] = {}

    def bad():
        calls.append("bad")
        if calls.count("bad") > 1:
            raise RuntimeError("boom")

    runners = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "bad": bad}
    out = interleaved(runners, device=torch.device("cpu"), warmup=1, repeats=3, errors=errors)
    assert set(out) == {"a", "b"} and errors == {"bad": "RuntimeError: boom"}
    assert len(out["a"].times) == len(out["b"].times) == 3
    assert paired_speedup([2.0, 2.0, 4.0], [1.0, 1.0, 1.0]) == 2.0
