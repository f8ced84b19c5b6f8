"""The training step: overfitting a single image, EMA and state round trips, NaN safety on the host
and on the device, resume."""

import io
import math

import pytest
import torch

from pipeline.checkpoint import model_for_sampling
from pipeline.ddpm.sampler import SamplerOptions, sample
from pipeline.ddpm.schedule import NoiseSchedule
from pipeline.ddpm.unet import preset
from pipeline.train.state import OptimConfig, TrainState, lr_at
from tests.unit.train.helpers import batch, tiny_state


def square_target() -> torch.Tensor:
    """An 8x8 target: a 4x4 bright square on a dark background (in [-1, 1])."""
    x0 = -torch.ones(1, 1, 8, 8)
    x0[:, :, 2:6, 2:6] = 1.0
    return x0


@pytest.mark.slow  # 400 training steps, two 50-step samplings: 11-15 s on 2 idle cores, minutes when shared
def test_tiny_model_overfits_the_square():
    torch.set_num_threads(2)
    schedule = NoiseSchedule("linear", 1000)
    cfg = OptimConfig(lr=2e-3, warmup_images=0, ema_decay=0.99, grad_clip=1.0)
    state = TrainState(preset("tiny", image_size=8, in_channels=1), schedule, cfg, seed=0)
    target = square_target()
    first = None
    for _ in range(400):
        r = state.train_step([target.expand(64, -1, -1, -1)])
        first = first if first is not None else r.loss_sum / r.images
    last = r.loss_sum / r.images
    assert last < 0.3 * first
    imgs = sample(state.ema.model, schedule, range(16), (1, 8, 8), SamplerOptions("ddim", steps=50, clip=True))
    err = (imgs - target).abs().mean(dim=(1, 2, 3))
    # An untrained model's samples are noise (mean abs error ~1); the square is recovered to < 0.15.
    assert err.median() < 0.15, err
    untrained = TrainState(preset("tiny", image_size=8, in_channels=1), schedule, cfg, seed=1).ema.model
    base = sample(untrained, schedule, range(16), (1, 8, 8), SamplerOptions("ddim", steps=50, clip=True))
    assert (base - target).abs().mean() > 0.5


def test_resume_equals_uninterrupted():
    a = tiny_state()
    losses_a = []
    for i in range(10):
        losses_a.append(a.train_step([batch(i)]).loss_sum)
        a.images_seen += 16
    b = tiny_state()
    for i in range(5):
        b.train_step([batch(i)])
        b.images_seen += 16
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    buf.seek(0)
    c = tiny_state(seed=123)  # different init and generator: everything must come from the checkpoint
    c.load_state_dict(torch.load(buf, weights_only=True))
    losses_c = []
    for i in range(5, 10):
        losses_c.append(c.train_step([batch(i)]).loss_sum)
        c.images_seen += 16
    # Same ops in the same order on the same machine: equal to float rounding.
    assert losses_c == pytest.approx(losses_a[5:], rel=1e-6)
    for p, q in zip(a.ema.model.parameters(), c.ema.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_ema_survives_save_and_load_exactly():
    s = tiny_state()
    for i in range(3):
        s.train_step([batch(i)])
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    m = model_for_sampling(state, ema=True)
    for p, q in zip(s.ema.model.state_dict().values(), m.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    assert state["ema"]["num_updates"] == 3


@pytest.mark.parametrize("skip_on_host", [True, False])
def test_non_finite_loss_never_touches_the_weights(skip_on_host):
    """Steps 0 (AdamW's first, decided on the host either way) and 2 (masked on the device when
    ``skip_on_host`` is False) get a NaN image."""
    s = tiny_state(skip_on_host=skip_on_host)
    for i in range(4):
        x = batch(i)
        if i % 2 == 0:
            x[0, 0, 0, 0] = float("nan")
        before = {k: v.clone() for k, v in _tensors(s).items()}
        r = s.train_step([x])
        if i % 2 == 0:
            assert not r.applied and s.skipped_steps == i // 2 + 1 and s.step_count == i + 1
            after = _tensors(s)
            assert after.keys() == before.keys()  # the skipped first step created no AdamW state
            for k, v in before.items():
                assert torch.equal(v, after[k]), k
        else:
            assert r.applied


def _run_with_bad_steps(skip_on_host: bool, steps: int = 12):
    """A run with non-finite steps: a NaN in the input at steps 0 (AdamW's first) and 4, in a
    gradient at 5 (so 4-5 are two in a row) and 9; two micro-batches per step, weight decay on."""
    s = tiny_state(skip_on_host=skip_on_host, warmup_images=64, weight_decay=0.01)
    poison_grad = [False]
    next(s.model.parameters()).register_hook(lambda g: g * float("nan") if poison_grad[0] else g)
    results = []
    for i in range(steps):
        x = batch(i)
        if i in (0, 4):
            x[0, 0, 0, 0] = float("nan")
        poison_grad[0] = i in (5, 9)
        results.append(s.train_step(list(x.split(8))))
        s.images_seen += 16
    return s, results


def _tensors(state: TrainState) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in state.model.state_dict().items()}
    out |= {f"ema.{k}": v for k, v in state.ema.model.state_dict().items()}
    opt = state.opt.state_dict()
    out |= {f"opt.{i}.{k}": v for i, st in opt["state"].items() for k, v in st.items()}
    return out


def test_masking_on_the_device_equals_skipping_on_the_host():
    """The device path (no host sync) and the host branch leave the same weights, EMA, AdamW moments
    and step counts, and the same counters, bit for bit."""
    host, host_results = _run_with_bad_steps(skip_on_host=True)
    device, device_results = _run_with_bad_steps(skip_on_host=False)
    assert [r.applied for r in host_results] == [i not in (0, 4, 5, 9) for i in range(12)]
    for a, b in zip(host_results, device_results, strict=True):
        assert torch.equal(a.finite, b.finite)
        torch.testing.assert_close(a.per_sample, b.per_sample, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(a.norm, b.norm, rtol=0, atol=0, equal_nan=True)
    ta, tb = _tensors(host), _tensors(device)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert host.opt.state_dict()["param_groups"] == device.opt.state_dict()["param_groups"]
    assert host.state_dict()["counters"] == device.state_dict()["counters"]
    assert (host.step_count, int(host.skipped_steps), int(host.ema.num_updates)) == (12, 4, 8)
    assert int(device.ema.num_updates) == 8 and next(iter(device.opt.state.values()))["step"] == 8


def test_warmup():
    cfg = OptimConfig(lr=1.0, warmup_images=100)
    assert lr_at(0, cfg) == pytest.approx(0.01)
    assert lr_at(49, cfg) == pytest.approx(0.5)
    assert lr_at(1000, cfg) == 1.0


def test_cosine_learning_rate_schedule():
    cfg = OptimConfig(lr=1.0, warmup_images=100, lr_schedule="cosine", min_lr_ratio=0.1, total_images=1100)
    assert lr_at(49, cfg) == pytest.approx(0.5)  # the warm-up is unchanged
    assert lr_at(100, cfg) == pytest.approx(1.0)
    assert lr_at(600, cfg) == pytest.approx(0.55)  # half-way: the mean of lr and min
    assert lr_at(350, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(1100, cfg) == pytest.approx(0.1) and lr_at(5000, cfg) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="total_images"):
        lr_at(200, OptimConfig(lr=1.0, warmup_images=100, lr_schedule="cosine", total_images=100))


def test_checkpoint_for_another_model_is_refused():
    s = tiny_state()
    other = TrainState(preset("digits", image_size=8, in_channels=1), NoiseSchedule("linear", 100), OptimConfig())
    with pytest.raises(ValueError, match="different U-Net"):
        other.load_state_dict(s.state_dict())


def test_ranks_share_initial_weights_but_not_dropout_randomness():
    a, b = tiny_state(rank=0), tiny_state(rank=1)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)
    torch.manual_seed(0)
    tiny_state(rank=0)
    after_a = torch.rand(8)
    tiny_state(rank=1)
    assert not torch.equal(after_a, torch.rand(8))  # the global generator (dropout) differs per rank


def test_resume_applies_this_runs_optimizer_settings():
    saved = tiny_state().state_dict()
    b = tiny_state(weight_decay=0.05)
    b.load_state_dict(saved)
    assert [g["weight_decay"] for g in b.opt.param_groups] == [0.05]


def test_optim_config_is_the_train_settings_of_its_names():
    """Derived, not copied: every OptimConfig field but the objective is a TrainConfig field, with the
    same default, and the job's OptimConfig carries the settings' values."""
    from dataclasses import fields

    from pipeline.config import Settings, TrainConfig
    from pipeline.train.loop import optim_config

    for f in fields(OptimConfig):
        if f.name != "objective":
            assert f.default == TrainConfig.model_fields[f.name].default, f.name
    s = Settings.from_cli(["--train.lr", "3e-3", "--train.fused-adamw", "--diffusion.objective", "v"])
    cfg = optim_config(s)
    assert (cfg.lr, cfg.fused_adamw, cfg.objective, cfg.total_images) == (3e-3, True, "v", s.train.total_images)
