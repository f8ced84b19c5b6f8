"""The search space and the sweep's settings: loaded, validated before any trial (errors name the
setting, the value and the reason), converted to Ray Tune's sampling objects."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, Settings
from pipeline.sweep.config import SweepSettings, trial_run_name
from pipeline.sweep.run import state_url
from pipeline.sweep.space import load_space, parse_space, sweepable_paths, to_tune, trial_values, with_values


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("DDPM_ENV_FILE", raising=False)


@pytest.fixture
def base() -> Settings:
    return Settings.model_validate({"model": {"preset": "tiny"}, "train": {"batch_size": 96}})


def test_every_kind_loads_with_pydantics_values(base, tmp_path):
    text = """
train.lr: {loguniform: [1e-4, 1e-3]}        # YAML reads 1e-4 as a string: the bounds become floats
train.ema-decay: [0.999, 0.9995]
diffusion.objective: {grid: [eps, v]}
train.grad_accum: {randint: [1, 3]}
train.weight_decay: {uniform: [0, 0.1]}
train.warmup_images: "2000"
model.channel_mult: {choice: [[1, 2], [1, 2, 2]]}
"""
    (tmp_path / "space.yaml").write_text(text)
    for space in (load_space(str(tmp_path / "space.yaml"), base), parse_space(text, base)):
        assert space.to_json() == {
            "train.lr": {"loguniform": [1e-4, 1e-3]},
            "train.ema_decay": {"choice": [0.999, 0.9995]},
            "diffusion.objective": {"grid": ["eps", "v"]},
            "train.grad_accum": {"randint": [1, 3]},
            "train.weight_decay": {"uniform": [0.0, 0.1]},
            "train.warmup_images": 2000,
            "model.channel_mult": {"choice": [[1, 2], [1, 2, 2]]},
        }
    assert space.grid_size() == 2
    assert "loguniform from 0.0001 to 0.001" in space.describe() and "randint from 1 to 3 excluded" in space.describe()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train.lrr: 0.1", r"train.lrr: unknown setting; did you mean train.lr"),
        ("trian.lr: 0.1", r"trian.lr: unknown setting; did you mean train.lr"),
        ("storage.endpoint_url: http://x", r"storage.endpoint_url: not a setting a sweep varies \(where"),
        ("cluster.num_workers: [1, 2]", r"cluster.num_workers: not a setting a sweep varies"),
        ("train.resume: true", r"train.resume: not a setting a sweep varies"),
        ("train.total_images: [1000, 2000]", r"train.total_images: not a setting a sweep varies \(the per-trial"),
        ("dry_run: true", r"dry_run: unknown setting"),
        ("train.lr: {foo: [1, 2]}", r"train.lr: a mapping must have exactly one key"),
        ("train.lr: {choice: []}", r"train.lr: choice takes a non-empty list"),
        ("train.lr: {uniform: [1]}", r"train.lr: uniform takes \[low, high\]"),
        ("train.lr: {uniform: [2, 1]}", r"train.lr: uniform needs low < high"),
        ("train.lr: {loguniform: [0, 1]}", r"train.lr: loguniform needs low > 0"),
        ("train.lr: {uniform: [a, 1]}", r"train.lr: uniform bounds must be numbers \(got 'a'\)"),
        ("train.lr: [0.001, -1]", r"train.lr=-1: invalid for a trial: train.lr: Input should be greater than 0"),
        ("train.ema_decay: {uniform: [0.99, 1.0]}", r"train.ema_decay=1.0: invalid .*less than 1"),
        ("diffusion.objective: {grid: [eps, score]}", r"diffusion.objective='score': invalid .*'eps', 'x0' or 'v'"),
        ("train.batch_size: {randint: [94, 96]}", r"train.batch_size=95: invalid .*divisible"),  # 95 = high - 1
        ("train.batch_size: {uniform: [32, 64]}", r"train.batch_size holds integers: uniform draws fractions"),
        ("model.preset: [tiny, huge]", r"model.preset='huge': invalid .*unknown preset"),
        # each value is valid alone; 64 with grad_accum 3 is not (64 % (2 workers x 3))
        ("train.batch_size: [96, 64]\ntrain.grad_accum: [1, 3]", r"train.batch_size=64, train.grad_accum=3: invalid"),
        (
            "train.ema_decay: 0.99\ntrain.ema-decay: 0.9",
            r"'train.ema_decay' and 'train.ema-decay' name the same setting",
        ),
        ("- train.lr", r"must be a mapping of setting -> value"),
        ("train.lr: [unclosed", r"not valid YAML"),
    ],
)
def test_bad_spaces_fail_naming_the_setting_and_value(base, text, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_space(text, base)
    assert str(e.value).startswith("invalid configuration:\n  sweep.space: ")


def test_a_missing_space_file_is_named(base, tmp_path):
    with pytest.raises(ConfigError, match=r"no space file '.*nope.yaml'"):
        load_space(str(tmp_path / "nope.yaml"), base)


def test_sweepable_paths_leave_out_where_and_how_runs_happen():
    paths = sweepable_paths()
    assert {"train.lr", "train.ema_decay", "diffusion.objective", "model.preset", "train.batch_size"} <= set(paths)
    assert not [p for p in paths if p.split(".")[0] in ("storage", "tracking", "cluster", "sample")]
    assert "train.run_name" not in paths and "train.validate_every_images" not in paths


def test_to_tune_and_back(base):
    from ray.tune.search.sample import Categorical, Float, Integer

    space = parse_space(
        "train.lr: {loguniform: [1.0e-4, 1.0e-3]}\ntrain.ema_decay: [0.999, 0.9995]\n"
        "diffusion.objective: {grid: [eps, v]}\ntrain.grad_accum: {randint: [1, 3]}\ntrain.seed: 7",
        base,
    )
    t = to_tune(space)
    assert isinstance(t["train.lr"], Float) and (t["train.lr"].lower, t["train.lr"].upper) == (1e-4, 1e-3)
    assert isinstance(t["train.ema_decay"], Categorical) and t["train.ema_decay"].categories == [0.999, 0.9995]
    assert t["diffusion.objective"] == {"grid_search": ["eps", "v"]}
    assert isinstance(t["train.grad_accum"], Integer) and t["train.seed"] == 7
    import numpy as np

    config = {"train.lr": np.float64(5e-4), "train.ema_decay": 0.999, "diffusion.objective": "v", "train.grad_accum": 2}
    values = trial_values(config | {"train.seed": 7, "unrelated": 1}, space)
    assert values == {"train.lr": 5e-4, "train.ema_decay": 0.999, "diffusion.objective": "v", "train.grad_accum": 2,
                      "train.seed": 7}  # fmt: skip
    assert type(values["train.lr"]) is float
    s = with_values(base, values)
    assert (s.train.lr, s.diffusion.objective, s.train.grad_accum, s.train.batch_size) == (5e-4, "v", 2, 96)


def _sweep(*args: str) -> SweepSettings:
    return SweepSettings.from_cli(["--sweep.space", "train.lr: [0.001]", *args])


def test_sweep_settings_check_the_budget_and_the_signal():
    ok = ["--train.validate-every-images", "1000", "--train.total-images", "10000", "--sweep.grace-images", "2000"]
    s = _sweep(*ok)
    base = s.base()
    assert type(base) is Settings and base.train.validate_every_images == 1000
    for args, message in [
        ([], r"needs the validation loss: pass --train.validate-every-images"),
        (
            ["--train.validate-every-images", "1000", "--sweep.grace-images", "200000"],
            r"grace_images=200000 must be below",
        ),
        (["--train.validate-every-images", "5000", "--sweep.grace-images", "2000"], r"at most sweep.grace_images=2000"),
        ([*ok, "--train.run-name", "x"], r"the sweep names and resumes its trials' runs itself"),
        ([*ok, "--sweep.resume"], r"sweep.resume needs sweep.name"),
        ([*ok, "--sweep.retry-failed"], r"retry_failed applies to a resumed sweep"),
        ([*ok, "--sweep.name", "-bad"], r"sweep.name"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _sweep(*args)
    with pytest.raises(ConfigError, match=r"sweep.space: give the search space"):
        SweepSettings.from_cli(["--sweep.stop-metric", "none", "--sweep.rank-metric", "fd"])
    # Without early stopping and ranked by FD, no validation loss is needed.
    assert _sweep("--sweep.stop-metric", "none").sweep.stop_metric == "none"


def test_trial_names_and_where_the_state_lives():
    assert trial_run_name("sw", "a1b2c_00003") == "sw-t3" and trial_run_name("sw", "odd") == "sw-odd"
    flags = ["--sweep.stop-metric", "none"]
    assert state_url(_sweep(*flags)) == "s3://ddpm-checkpoints/sweeps"
    assert state_url(_sweep(*flags, "--storage.checkpoint-url", "s3://b/x/runs")) == "s3://b/x/sweeps"
    assert state_url(_sweep(*flags, "--storage.checkpoint-url", "s3://b")) == "s3://b/sweeps"
    assert state_url(_sweep(*flags, "--storage.checkpoint-url", "/data/ckpt/runs/")) == "/data/ckpt/sweeps"
    assert state_url(_sweep(*flags, "--sweep.state-url", "s3://c/mine/")) == "s3://c/mine"


def test_the_job_refuses_a_bad_space_before_any_work(capsys):
    from jobs.sweep import main

    flags = ["--train.validate-every-images", "1000", "--train.total-images", "10000", "--sweep.grace-images", "2000"]
    assert main([*flags, "--sweep.space", "{train.lr: [0.001, 0], train.ema_decay: 0.99}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid configuration:\n  sweep.space: train.lr=0: invalid for a trial")
    assert main([*flags, "--sweep.space", "{model.presett: tiny}"]) == 2
    assert "model.presett: unknown setting; did you mean model.preset" in capsys.readouterr().err
    assert main([*flags, "--sweep.space", "{train.lr: {loguniform: [1.0e-4, 1.0e-3]}}", "--dry-run"]) == 0
    assert "search space (1 trial(s) of 10,000 images at most):\n  train.lr  loguniform from 0.0001 to 0.001" in (
        capsys.readouterr().out
    )


def test_a_name_is_never_silently_reused_and_a_resume_keeps_what_trials_train():
    from pipeline.sweep.run import changed_params, check_name

    check_name("sw", "s3://b/sweeps", exists=False, resume=False)
    check_name("sw", "s3://b/sweeps", exists=True, resume=True)
    with pytest.raises(
        ConfigError, match=r"a sweep named 'sw' already exists under s3://b/sweeps; pass --sweep.resume"
    ):
        check_name("sw", "s3://b/sweeps", exists=True, resume=False)
    with pytest.raises(ConfigError, match=r"--sweep.resume: no sweep named 'sw' under s3://b/sweeps"):
        check_name("sw", "s3://b/sweeps", exists=False, resume=True)
    held = {
        "train.lr": ("0.001", "0.002"),
        "space.train.lr": ('{"grid": [1]}', '{"grid": [2]}'),
        "storage.endpoint_url": ("http://a", "http://b"),
        "tracking.uri": ("http://a", "http://b"),
        "cluster.address": ("a", "b"),
        "cluster.num_workers": ("1", "2"),
        "sweep.resume": ("False", "True"),
        "sweep.space": ("a.yaml", "b.yaml"),
        "sweep.max_concurrent": ("1", "2"),
    }
    assert set(changed_params(held)) == {"train.lr", "space.train.lr", "cluster.num_workers", "sweep.max_concurrent"}
