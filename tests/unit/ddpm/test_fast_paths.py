"""Speed options change speed, not results: channels_last, SDPA vs math attention, torch.compile and
bf16 autocast against fp32 eager, in training (TrainState) and sampling; the sampler's CUDA-graph paths.

Tolerances (float32 on this CPU): a different convolution/attention kernel reorders sums, so losses
agree to ~1e-6 relative and samples to ~1e-5 absolute; 1e-4 is asserted. bf16 autocast keeps an
8-bit mantissa: a loss within 2% relative.

torch only (no Ray, MLflow, pydantic): benchmarks/gpu_check.sh runs the ``cuda``-marked tests on a bare GPU box.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from benchmarks.perf import perturb_
from pipeline.ddpm.loss import diffusion_loss
from pipeline.ddpm.sampler import CUDAGraphModel, SamplerOptions, sample
from pipeline.ddpm.schedule import NoiseSchedule
from pipeline.ddpm.unet import UNet, preset
from pipeline.train.state import OptimConfig, TrainState

SCHED = NoiseSchedule("linear", 20)
SHAPE = (1, 8, 8)


def _tiny(attention: str = "sdpa", seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return perturb_(UNet(preset("tiny", image_size=8, in_channels=1, attention=attention)), 0.05, seed)


def _pair(attention: str = "sdpa") -> tuple[UNet, UNet]:
    """The same weights twice: contiguous and channels_last."""
    a = _tiny(attention).eval().requires_grad_(False)
    b = _tiny(attention).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    return a, b


def _state(**cfg) -> TrainState:
    attention = cfg.pop("attention", "sdpa")
    return TrainState(
        preset("tiny", image_size=8, in_channels=1, attention=attention),
        NoiseSchedule("linear", 100),
        OptimConfig(lr=1e-3, warmup_images=0, **cfg),
        seed=0,
    )


def _batch(i: int) -> torch.Tensor:
    return torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(i)) * 2 - 1


def _losses(state: TrainState, steps: int = 3) -> list[float]:
    return [state.train_step([_batch(i)]).loss_sum for i in range(steps)]


# -- training options ---------------------------------------------------------------------------------------


def test_channels_last_training_matches_fp32_eager():
    base, cl = _state(), _state(channels_last=True)
    assert _losses(cl) == pytest.approx(_losses(base), rel=1e-4)
    for p, q in zip(base.model.parameters(), cl.model.parameters(), strict=True):
        torch.testing.assert_close(p, q.contiguous(), rtol=1e-4, atol=1e-5)


def test_math_attention_training_matches_sdpa():
    # The tiny preset's only attention block is the middle one: enough to tell the kernels apart.
    assert any(m.__class__.__name__ == "AttnBlock" for m in _state().model.modules())
    base, math = _state(), _state(attention="math")
    assert _losses(math) == pytest.approx(_losses(base), rel=1e-4)


def test_compile_training_matches_eager_aot_eager_backend(monkeypatch):
    """TrainState(compile=True) goes through parallelize's torch.compile; here with backend aot_eager.

    aot_eager runs dynamo's graph capture and AOTAutograd's forward/backward split (the code path of
    the real compile) but executes the captured ATen graph without generating kernels, so it takes
    seconds on this CPU; inductor itself is test_compile_inductor_matches_eager below.
    """
    real = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(real, backend="aot_eager"))
    torch._dynamo.reset()
    try:
        base, comp = _state(), _state(compile=True)
        assert comp.net is not comp.model  # really wrapped
        assert _losses(comp) == pytest.approx(_losses(base), rel=1e-5)
        for p, q in zip(base.model.parameters(), comp.model.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()


@pytest.mark.skipif(
    os.environ.get("DDPM_TEST_INDUCTOR") != "1",
    reason="inductor takes ~80 s to compile even the tiny U-Net on this 2-core CPU (over the test budget); "
    "the compile code path is tested with backend aot_eager; DDPM_TEST_INDUCTOR=1 runs this",
)
def test_compile_inductor_matches_eager():
    torch._dynamo.reset()
    try:
        base, comp = _state(), _state(compile=True)
        assert _losses(comp, 2) == pytest.approx(_losses(base, 2), rel=1e-4)
        model = _tiny().eval()
        eager = sample(model, SCHED, range(4), SHAPE, SamplerOptions("ancestral"))
        compiled = sample(model, SCHED, range(4), SHAPE, SamplerOptions("ancestral"), compile_mode="default")
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    finally:
        torch._dynamo.reset()


def test_bf16_autocast_loss_close_to_fp32_single_forward():
    """Correctness only: bf16 on this CPU runs ~300x slower, so one small forward."""
    model = _tiny().train()
    x0 = _batch(0)[:4]
    losses = {}
    for dtype in (None, torch.bfloat16):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            g = torch.Generator().manual_seed(3)
            losses[dtype] = diffusion_loss(model, NoiseSchedule("linear", 100), x0, generator=g).mean.item()
    assert losses[torch.bfloat16] == pytest.approx(losses[None], rel=2e-2)


# -- sampling options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ancestral", "ddim"])
def test_channels_last_sampling_matches(method):
    a, b = _pair()
    opts = SamplerOptions(method, steps=10)
    ref = sample(a, SCHED, range(6), SHAPE, opts)
    got = sample(b, SCHED, range(6), SHAPE, opts, channels_last=True)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert ref.abs().max() > 0.1  # not a trivial all-zero model


def test_math_attention_sampling_matches_sdpa():
    sdpa = _tiny("sdpa").eval()
    math = _tiny("math").eval()
    ref = sample(sdpa, SCHED, range(6), SHAPE, SamplerOptions("ancestral"))
    torch.testing.assert_close(
        sample(math, SCHED, range(6), SHAPE, SamplerOptions("ancestral")), ref, rtol=1e-4, atol=1e-4
    )


@pytest.mark.slow  # dynamo traces the U-Net: 3-4 s on 2 idle cores, 10-20 s when they are shared
def test_sampler_compile_mode_matches_eager_and_keeps_one_call_per_step():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        model = _tiny().eval()
        calls = []
        handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
        ref = sample(model, SCHED, range(4), SHAPE, SamplerOptions("ancestral"))
        handle.remove()
        assert len(calls) == SCHED.num_timesteps
        opts = dict(compile_mode="default", compile_backend="aot_eager")
        got = sample(model, SCHED, range(4), SHAPE, SamplerOptions("ancestral"), **opts)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1
        # A second call wraps the model again but reuses dynamo's cache: nothing is recompiled.
        again = sample(model, SCHED, range(4), SHAPE, SamplerOptions("ancestral"), **opts)
        assert counters["stats"]["unique_graphs"] == graphs
        torch.testing.assert_close(again, got, rtol=0, atol=0)
    finally:
        torch._dynamo.reset()


def test_cuda_graph_options_are_refused_off_gpu():
    model = _tiny().eval()
    with pytest.raises(ValueError, match="CUDA device"):
        sample(model, SCHED, [0], SHAPE, cuda_graph=True)
    with pytest.raises(ValueError, match="not both"):
        sample(model, SCHED, [0], SHAPE, cuda_graph=True, compile_mode="reduce-overhead")
    with pytest.raises(RuntimeError, match="CUDA device"):
        CUDAGraphModel(model)(torch.zeros(1, *SHAPE), torch.zeros(1, dtype=torch.long))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")
def test_cuda_graph_and_reduce_overhead_match_eager_on_gpu():
    model = _tiny().cuda().eval()
    ref = sample(model, SCHED, range(8), SHAPE, SamplerOptions("ancestral"), device="cuda")
    got = sample(model, SCHED, range(8), SHAPE, SamplerOptions("ancestral"), device="cuda", cuda_graph=True)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    wrapped = CUDAGraphModel(model)
    for _ in range(2):  # captured once, replayed by both calls
        got = sample(wrapped, SCHED, range(8), SHAPE, SamplerOptions("ancestral"), device="cuda")
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    got = sample(
        model, SCHED, range(8), SHAPE, SamplerOptions("ancestral"), device="cuda", compile_mode="reduce-overhead"
    )
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
