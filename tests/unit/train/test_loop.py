"""The loop (pipeline.train.loop.train_worker, one process): rollback after repeated non-finite steps,
read by the NaN guard at log steps and checkpoints."""

import shutil

import pytest
import torch

from pipeline.checkpoint import images_of
from pipeline.config import Settings
from pipeline.train.checkpointer import Session
from pipeline.train.loop import NanGuard, optim_config, reached, train_worker
from pipeline.train.state import TrainState


def test_schedules_fire_when_a_multiple_is_passed():
    assert not reached(128, 96, 127) and reached(128, 127, 128) and reached(128, 120, 300)
    assert not reached(128, 128, 255) and not reached(0, 0, 10**9)


def test_nan_guard_remembers_the_longest_run_until_read():
    guard = NanGuard(3, torch.device("cpu"))
    for finite in [1, 0, 0, 0, 1, 1]:  # three in a row, then recovered before anyone looked
        guard.observe(torch.tensor(bool(finite)))
    assert guard.tripped() == 3
    guard.reset()
    for finite in [0, 0, 1, 0, 0]:
        guard.observe(torch.tensor(bool(finite)))
    assert guard.tripped() == 0
    guard.observe(torch.tensor(False))
    assert guard.tripped() == 3


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    from jobs import prepare_data

    out = tmp_path_factory.mktemp("digits")
    assert prepare_data.main(["--out", str(out), "--no-progress"]) == 0
    return out


def _run_loop(
    data_url, store, poison_calls, monkeypatch, loader_workers="auto", log_every=1, every=128, skip_on_host=None
):
    """train_worker on local shards with checkpoints kept in ``store``; train_step calls numbered in
    ``poison_calls`` (1-based, counted across rollbacks) get NaN images. Returns (state, reports, calls)."""
    settings = Settings.from_cli(
        ["--model.preset", "tiny", "--diffusion.num-timesteps", "100", "--data.url", str(data_url),
         "--train.batch-size", "32", "--train.total-images", "384", "--train.checkpoint-every-images", str(every),
         "--train.sample-every-images", "0", "--train.warmup-images", "64", "--train.max-bad-steps", "3",
         "--train.log-every-steps", str(log_every), "--data.loader-workers", str(loader_workers)]
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

    def train_step(self, micro_batches, **kw):
        calls[0] += 1
        if calls[0] in poison_calls:
            micro_batches = [m * float("nan") for m in micro_batches]
        return original(self, micro_batches, **kw)

    kept = []

    def init(self, *a, **kw):
        original_init(self, *a, **kw | {"skip_on_host": skip_on_host})
        kept.append(self)

    with monkeypatch.context() as m:  # undone on return, so a second run wraps the originals again
        m.setattr(TrainState, "train_step", train_step)
        m.setattr(TrainState, "__init__", init)
        train_worker(settings, Session(report=report, candidates=candidates))
    return kept[-1], reports, calls[0]


@pytest.mark.parametrize(
    "loader_workers,log_every,every,first_bad,skip_on_host",
    [
        ("auto", 1, 128, 2, None),  # read in-process (the CPU default), the guard read every step
        (1, 1, 128, 2, None),  # through a DataLoader worker
        # The guard read every 4th step and at checkpoints (every ~6 steps), after steps masked on the
        # device: it trips two steps after the third bad one.
        ("auto", 4, 192, 1, False),
    ],
)
def test_repeated_non_finite_steps_roll_back_and_then_equal_an_uninterrupted_run(
    digits_folder, tmp_path, monkeypatch, loader_workers, log_every, every, first_bad, skip_on_host
):
    kw = {"loader_workers": loader_workers, "log_every": log_every, "every": every, "skip_on_host": skip_on_host}
    clean, clean_reports, clean_calls = _run_loop(digits_folder, tmp_path / "a", (), monkeypatch, **kw)
    saved_at = [r["step"] for r in clean_reports]
    k = saved_at[0]  # the step of the first checkpoint (batches vary by a sample or so)
    # Steps k+first_bad .. +2 are non-finite. The guard trips at the first step from the third on where
    # it is read (a log step or a checkpoint); the loop rolls back to the checkpoint at step k from there.
    poison = tuple(range(k + first_bad, k + first_bad + 3))
    tripped = next(s for s in range(poison[-1], clean_calls + 1) if s % log_every == 0 or s in saved_at)
    assert log_every == 1 or tripped > poison[-1]  # the lagged case does lag
    import psutil

    before = {c.pid for c in psutil.Process().children(recursive=True)}
    rolled, reports, calls = _run_loop(digits_folder, tmp_path / "b", poison, monkeypatch, **kw)
    left = [c for c in psutil.Process().children(recursive=True) if c.pid not in before and c.is_running()]
    assert [c for c in left if c.status() != psutil.STATUS_ZOMBIE] == []  # the rewound streams' workers stopped
    assert calls == clean_calls + tripped - k  # steps k+1..tripped are done again after the rollback
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


def test_validation_loss_is_reported_and_is_the_eps_error_on_a_fixed_set(digits_folder, tmp_path, monkeypatch):
    """Every rank reports val_loss at each crossing of validate_every_images and at the end; checkpoint
    reports carry the last one. The set does not depend on the run's seed or objective."""
    from pipeline.train.validate import Validator

    settings = Settings.from_cli(
        ["--model.preset", "tiny", "--diffusion.num-timesteps", "100", "--data.url", str(digits_folder),
         "--train.batch-size", "32", "--train.total-images", "320", "--train.checkpoint-every-images", "160",
         "--train.sample-every-images", "0", "--train.validate-every-images", "128",
         "--train.validate-images", "40", "--train.loss-weighting", "min_snr"]
    )  # fmt: skip
    settings.tracking.uri = None
    reports = []
    train_worker(settings, Session(report=lambda m, d, n: reports.append(m)))
    vals = [(r["images_seen"], r["val_loss"]) for r in reports if "step" not in r]
    ckpts = [r for r in reports if "step" in r]
    final = ckpts[-1]["images_seen"]
    assert [i // 128 for i, _ in vals] == [1, 2, final // 128] and vals[-1][0] == final >= 320
    assert all(0 < v < 5 for _, v in vals)
    assert len(ckpts) == 2 and ckpts[-1]["val_loss"] == vals[-1][1]

    a = Validator(TrainState(settings.unet_config(), settings.diffusion.build(), optim_config(settings)), settings)
    other = settings.model_copy(deep=True)
    other.train.seed, other.diffusion.objective = 7, "v"
    b = Validator(TrainState(other.unet_config(), other.diffusion.build(), optim_config(other), seed=7), other)
    assert torch.equal(a.x_t, b.x_t) and torch.equal(a.t, b.t) and torch.equal(a.noise, b.noise)
    assert a.t.tolist() == torch.linspace(0, 99, 40).round().long().tolist()
    with torch.no_grad():
        direct = (a.state.ema.model.eval()(a.x_t, a.t) - a.noise).pow(2).mean()
    assert a.loss() == pytest.approx(float(direct), rel=1e-6)
