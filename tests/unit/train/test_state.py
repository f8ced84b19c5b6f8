"""The training step: overfitting a single image, EMA and state round trips, NaN safety, resume."""

import io

import pytest
import torch

from pipeline.ddpm.sampler import SamplerOptions, sample
from pipeline.ddpm.schedule import NoiseSchedule
from pipeline.ddpm.unet import preset
from pipeline.train.state import OptimConfig, TrainState, lr_at, model_for_sampling


def square_target() -> torch.Tensor:
    """Seed 001's 8x8 target: a 4x4 bright square on a dark background (in [-1, 1])."""
    x0 = -torch.ones(1, 1, 8, 8)
    x0[:, :, 2:6, 2:6] = 1.0
    return x0


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


def _state(seed=0, rank=0, **kw):
    return TrainState(
        preset("tiny", image_size=8, in_channels=1),
        NoiseSchedule("linear", 100),
        OptimConfig(lr=1e-3, warmup_images=256, **kw),
        seed=seed,
        rank=rank,
    )


def _batch(i):
    g = torch.Generator().manual_seed(i)
    return torch.rand(16, 1, 8, 8, generator=g) * 2 - 1


def test_resume_equals_uninterrupted():
    a = _state()
    losses_a = []
    for i in range(10):
        losses_a.append(a.train_step([_batch(i)]).loss_sum)
        a.images_seen += 16
    b = _state()
    for i in range(5):
        b.train_step([_batch(i)])
        b.images_seen += 16
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    buf.seek(0)
    c = _state(seed=123)  # different init and generator: everything must come from the checkpoint
    c.load_state_dict(torch.load(buf, weights_only=True))
    losses_c = []
    for i in range(5, 10):
        losses_c.append(c.train_step([_batch(i)]).loss_sum)
        c.images_seen += 16
    # Same ops in the same order on the same machine: equal to float rounding.
    assert losses_c == pytest.approx(losses_a[5:], rel=1e-6)
    for p, q in zip(a.ema.model.parameters(), c.ema.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_ema_survives_save_and_load_exactly():
    s = _state()
    for i in range(3):
        s.train_step([_batch(i)])
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    m = model_for_sampling(state, ema=True)
    for p, q in zip(s.ema.model.state_dict().values(), m.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    assert state["ema"]["num_updates"] == 3


def test_non_finite_loss_never_touches_the_weights():
    s = _state()
    before = [p.detach().clone() for p in s.model.parameters()]
    ema_before = [p.detach().clone() for p in s.ema.model.parameters()]
    bad = _batch(0)
    bad[0, 0, 0, 0] = float("nan")
    r = s.train_step([bad])
    assert not r.applied and s.skipped_steps == 1
    for p, q in zip(before, s.model.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(ema_before, s.ema.model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert s.train_step([_batch(1)]).applied


def test_warmup():
    cfg = OptimConfig(lr=1.0, warmup_images=100)
    assert lr_at(0, cfg) == pytest.approx(0.01)
    assert lr_at(49, cfg) == pytest.approx(0.5)
    assert lr_at(1000, cfg) == 1.0


def test_checkpoint_for_another_model_is_refused():
    s = _state()
    other = TrainState(preset("digits", image_size=8, in_channels=1), NoiseSchedule("linear", 100), OptimConfig())
    with pytest.raises(ValueError, match="different U-Net"):
        other.load_state_dict(s.state_dict())


class _Position:
    """Stands in for the data reader's position (the reader itself is tested in test_data.py)."""

    def __init__(self):
        self.state = {"epoch": 0, "batch": 0}

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, s):
        self.state = dict(s)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    from pipeline.checkpoint import checkpoint_name, write_checkpoint
    from pipeline.train.loop import Session, restore

    s = _state()
    dirs = []
    for i in range(2):
        s.train_step([_batch(i)])
        s.images_seen += 16
        full = s.state_dict() | {
            "reader": {"epoch": 0, "batch": i + 1},
            "rng_per_rank": [{"generator": s.generator.get_state(), "torch": torch.get_rng_state()}],
            "samples_skipped": 0,
        }
        dirs.append(write_checkpoint(full, tmp_path / checkpoint_name(s.images_seen)))
    # A checkpoint whose file was cut short, and one whose meta.json was never written.
    data = (dirs[1] / "checkpoint.pt").read_bytes()
    (dirs[1] / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    unfinished = tmp_path / checkpoint_name(999)
    unfinished.mkdir()
    (unfinished / "checkpoint.pt").write_bytes(data)
    fresh, pos = _state(seed=5), _Position()
    session = Session(report=lambda *a: None, candidates=lambda: [unfinished, dirs[1], dirs[0]])
    info = restore(fresh, pos, session, rank=0, world=1)
    assert info["path"] == str(dirs[0])
    assert fresh.images_seen == 16 and pos.state["batch"] == 1
    assert restore(_state(), _Position(), Session(report=lambda *a: None), rank=0, world=1) == {}


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_trainer_save_then_restore_continues_identically(tmp_path, device):
    """pipeline.train.loop.save / restore, on the model's device (random states stay CPU tensors)."""
    import shutil

    from pipeline.train.loop import Session, restore, save

    def make(seed):
        return TrainState(
            preset("tiny", image_size=8, in_channels=1),
            NoiseSchedule("linear", 100),
            OptimConfig(lr=1e-3, warmup_images=256),
            device=device,
            seed=seed,
        )

    def report(metrics, directory, name):
        if directory is not None:
            shutil.copytree(directory, tmp_path / name)

    a = make(0)
    for i in range(3):
        a.train_step([_batch(i)])
        a.images_seen += 16
    save(a, _Position(), Session(report=report), tracker=None, rank=0, samples_skipped=7)
    b, pos = make(5), _Position()
    info = restore(b, pos, Session(report=report, candidates=lambda: sorted(tmp_path.iterdir())), rank=0, world=1)
    assert info["samples_skipped"] == 7 and b.images_seen == 48 and b.step_count == 3
    assert torch.equal(b.generator.get_state(), a.generator.get_state())
    ra, rb = a.train_step([_batch(3)]), b.train_step([_batch(3)])
    assert ra.loss_sum == pytest.approx(rb.loss_sum, rel=1e-5)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert q.device == p.device and torch.allclose(p, q, rtol=1e-5, atol=1e-6)


def test_ranks_share_initial_weights_but_not_dropout_randomness():
    a, b = _state(rank=0), _state(rank=1)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)
    torch.manual_seed(0)
    _state(rank=0)
    after_a = torch.rand(8)
    _state(rank=1)
    assert not torch.equal(after_a, torch.rand(8))  # the global generator (dropout) differs per rank


def test_resume_applies_this_runs_optimizer_settings():
    saved = _state().state_dict()
    b = TrainState(
        preset("tiny", image_size=8, in_channels=1),
        NoiseSchedule("linear", 100),
        OptimConfig(lr=1e-3, warmup_images=256, weight_decay=0.05),
    )
    b.load_state_dict(saved)
    assert [g["weight_decay"] for g in b.opt.param_groups] == [0.05]


def test_a_noise_generator_state_from_another_device_is_reseeded(tmp_path, capsys):
    """A run saved on a GPU (16-byte CUDA generator state) resumes on a CPU worker, and vice versa."""
    import shutil

    from pipeline.train.loop import Session, restore, save

    def report(metrics, directory, name):
        if directory is not None:
            shutil.copytree(directory, tmp_path / name)

    a = _state()
    a.train_step([_batch(0)])
    a.images_seen += 16
    save(a, _Position(), Session(report=report), tracker=None, rank=0, samples_skipped=0)
    (ckpt,) = tmp_path.iterdir()
    from pipeline.checkpoint import read_checkpoint, write_checkpoint

    full, _ = read_checkpoint(ckpt)
    full["rng_per_rank"][0]["generator"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's size
    shutil.rmtree(ckpt)
    write_checkpoint(full, ckpt)
    states = []
    for _ in range(2):
        b = _state(seed=5)
        restore(b, _Position(), Session(report=report, candidates=lambda: [ckpt]), rank=0, world=1)
        states.append(b.generator.get_state())
    assert "reseeded from the counters" in capsys.readouterr().out
    assert torch.equal(states[0], states[1]) and not torch.equal(states[0], _state(seed=5).generator.get_state())


# ------------------------------------------------------------------------------------------------
# The loop's rollback after repeated non-finite steps (pipeline.train.loop.train_worker, one process)


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    from jobs import prepare_data

    out = tmp_path_factory.mktemp("digits")
    assert prepare_data.main(["--out", str(out), "--no-progress"]) == 0
    return out


def _run_loop(data_url, store, poison_calls, monkeypatch, loader_workers="auto"):
    """train_worker on local shards with checkpoints kept in ``store``; train_step calls numbered in
    ``poison_calls`` (1-based, counted across rollbacks) get NaN images. Returns (state, reports, calls)."""
    import shutil

    from pipeline.checkpoint import images_of
    from pipeline.config import Settings
    from pipeline.train.loop import Session, train_worker

    settings = Settings.from_cli(
        ["--model.preset", "tiny", "--diffusion.num-timesteps", "100", "--data.url", str(data_url),
         "--train.batch-size", "32", "--train.total-images", "384", "--train.checkpoint-every-images", "128",
         "--train.sample-every-images", "0", "--train.warmup-images", "64", "--train.max-bad-steps", "3",
         "--data.loader-workers", str(loader_workers)]
    )  # fmt: skip
    settings.tracking.uri = None
    store.mkdir()
    reports = []

    def report(metrics, directory, name):
        reports.append(metrics)
        if directory is not None:
            shutil.copytree(directory, store / name)

    candidates = lambda: sorted(store.iterdir(), key=lambda p: images_of(p.name), reverse=True)
    calls, original, original_init = [0], TrainState.train_step, TrainState.__init__

    def train_step(self, micro_batches):
        calls[0] += 1
        if calls[0] in poison_calls:
            micro_batches = [m * float("nan") for m in micro_batches]
        return original(self, micro_batches)

    kept = []
    with monkeypatch.context() as m:  # undone on return, so a second run wraps the originals again
        m.setattr(TrainState, "train_step", train_step)
        m.setattr(TrainState, "__init__", _keep(original_init, kept))
        train_worker(settings, Session(report=report, candidates=candidates))
    return kept[-1], reports, calls[0]


def _keep(init, kept):
    def wrapped(self, *a, **kw):
        init(self, *a, **kw)
        kept.append(self)

    return wrapped


@pytest.mark.parametrize("loader_workers", ["auto", 1])  # in-process reading (CPU default), a DataLoader worker
def test_repeated_non_finite_steps_roll_back_and_then_equal_an_uninterrupted_run(
    digits_folder, tmp_path, monkeypatch, loader_workers
):
    clean, clean_reports, clean_calls = _run_loop(digits_folder, tmp_path / "a", (), monkeypatch, loader_workers)
    k = clean_reports[0]["step"]  # the step of the first checkpoint (batches vary by a sample or so)
    # Steps k+2..k+4 are non-finite: after the third, roll back to the checkpoint at step k.
    import psutil

    before = {c.pid for c in psutil.Process().children(recursive=True)}
    poison = (k + 2, k + 3, k + 4)
    rolled, reports, calls = _run_loop(digits_folder, tmp_path / "b", poison, monkeypatch, loader_workers)
    left = [c for c in psutil.Process().children(recursive=True) if c.pid not in before and c.is_running()]
    assert [c for c in left if c.status() != psutil.STATUS_ZOMBIE] == []  # the rewound streams' workers stopped
    assert calls == clean_calls + 4  # steps k+1..k+4 are done again after the rollback
    assert [r["images_seen"] for r in reports] == [r["images_seen"] for r in clean_reports]
    assert rolled.step_count == clean.step_count and rolled.skipped_steps == clean.skipped_steps == 0
    assert rolled.images_seen == clean.images_seen >= 384
    for p, q in zip(clean.model.state_dict().values(), rolled.model.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(clean.ema.model.state_dict().values(), rolled.ema.model.state_dict().values(), strict=True):
        assert torch.equal(p, q)


def test_divergence_before_any_checkpoint_is_a_clear_error(digits_folder, tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="no checkpoint to roll back to; lower --train.lr"):
        _run_loop(digits_folder, tmp_path / "c", (1, 2, 3), monkeypatch)
