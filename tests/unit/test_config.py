"""Typed settings: env and CLI overrides, validation messages that name the field, --dry-run."""

import json
import re

import pytest

from pipeline.config import REPO_ROOT, ConfigError, Settings


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("DDPM_ENV_FILE", raising=False)
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # restored after the test, also if set by it
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)


def test_defaults_resolve_to_the_digits_model():
    s = Settings.from_cli([])
    u = s.unet_config()
    assert (u.image_size, u.in_channels, u.base_channels) == (8, 1, 32)
    assert s.diffusion.build().num_timesteps == 1000


def test_env_and_cli_override_cli_wins(monkeypatch):
    monkeypatch.setenv("DDPM_TRAIN__BATCH_SIZE", "64")
    monkeypatch.setenv("DDPM_DIFFUSION__SCHEDULE", "cosine")
    s = Settings.from_cli([])
    assert s.train.batch_size == 64 and s.diffusion.schedule == "cosine"
    s = Settings.from_cli(["--train.batch-size", "32", "--model.channel-mult", "[1,2,2,2]"])
    assert s.train.batch_size == 32 and s.unet_config().channel_mult == (1, 2, 2, 2)


def test_service_variables_and_env_file(monkeypatch, tmp_path):
    (tmp_path / "env.json").write_text(
        json.dumps(
            {
                "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
                "AWS_ACCESS_KEY_ID": "k",
                "AWS_SECRET_ACCESS_KEY": "s",
                "MLFLOW_TRACKING_URI": "http://127.0.0.1:2",
                "RAY_ADDRESS": "http://127.0.0.1:3",
            }
        )
    )
    monkeypatch.setenv("DDPM_ENV_FILE", str(tmp_path / "env.json"))
    s = Settings.from_cli([])
    assert s.storage.endpoint_url == "http://127.0.0.1:1" and s.tracking.uri == "http://127.0.0.1:2"
    assert s.storage.secret_access_key.get_secret_value() == "s"
    assert "**" in s.dump() and '"s"' not in s.dump()  # secrets are masked when printed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert Settings.from_cli([]).tracking.uri == "http://127.0.0.1:9"
    monkeypatch.setenv("DDPM_TRACKING__URI", "http://127.0.0.1:10")
    assert Settings.from_cli([]).tracking.uri == "http://127.0.0.1:10"
    monkeypatch.setenv("DDPM_ENV_FILE", str(tmp_path / "missing.json"))  # named, so it must exist
    with pytest.raises(ConfigError, match="DDPM_ENV_FILE="):
        Settings.from_cli([])


def test_mlflow_login_from_the_env_file_reaches_the_mlflow_client(monkeypatch, tmp_path):
    """MLflow's client reads its login from os.environ only: the env file's login is exported there, as a
    pair, when the file's server is the one used; never towards another server, never over a login
    already exported."""
    from mlflow.environment_variables import MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_USERNAME

    login = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "from-file"}
    (tmp_path / "env.json").write_text(json.dumps({"MLFLOW_TRACKING_URI": "http://127.0.0.1:2", **login}))
    monkeypatch.setenv("DDPM_ENV_FILE", str(tmp_path / "env.json"))
    Settings.from_cli(["--tracking.uri", "http://other.example:5000"])
    assert (MLFLOW_TRACKING_USERNAME.get(), MLFLOW_TRACKING_PASSWORD.get()) == (None, None)
    Settings.from_cli([])
    assert (MLFLOW_TRACKING_USERNAME.get(), MLFLOW_TRACKING_PASSWORD.get()) == ("admin", "from-file")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "someone")  # half a login exported: not completed
    Settings.from_cli([])
    assert (MLFLOW_TRACKING_USERNAME.get(), MLFLOW_TRACKING_PASSWORD.get()) == ("someone", None)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--diffusion.beta-start", "0.02", "--diffusion.beta-end", "0.01"], "diffusion.beta_end"),
        (["--diffusion.num-timesteps", "1"], "diffusion.num_timesteps"),
        (["--data.image-size", "6"], "image_size=6 is not divisible"),
        (["--data.image-size", "12", "--model.preset", "cifar"], "not divisible"),
        (["--model.preset", "huge"], "model.preset"),
        (["--train.batch-size", "0"], "train.batch_size"),
        (["--train.resume"], "train.run_name"),
        (["--sample.method", "euler"], "sample.method"),
        (["--no-such-flag", "1"], "unrecognized arguments"),
        (["--data.loader-workers", "-1"], "data.loader_workers"),
        (["--data.loader-workers", "many"], "data.loader_workers"),
    ],
)
def test_invalid_values_are_rejected_naming_the_field(argv, needle):
    with pytest.raises(ConfigError) as e:
        Settings.from_cli(argv)
    assert needle in str(e.value)


def test_loader_workers_auto_depends_on_the_device(monkeypatch):
    d = Settings.from_cli([]).data
    assert d.loader_workers == "auto" and (d.workers_for("cpu"), d.workers_for("cuda")) == (0, 2)
    d = Settings.from_cli(["--data.loader-workers", "3"]).data
    assert d.loader_workers == 3 and (d.workers_for("cpu"), d.workers_for("cuda")) == (3, 3)
    monkeypatch.setenv("DDPM_DATA__LOADER_WORKERS", "0")
    assert Settings.from_cli([]).data.workers_for("cuda") == 0


def test_flat_params_for_tracking():
    p = Settings.from_cli(["--model.channel-mult", "[1,2,2]"]).flat_params()
    assert p["train.batch_size"] == "128" and p["model.channel_mult"] == "[1, 2, 2]"


def test_readme_configuration_reference_is_current():
    """The README's reference is generated from the settings classes, so it cannot drift."""
    from pipeline.config import readme_with_reference

    text = (REPO_ROOT / "README.md").read_text()
    assert readme_with_reference(text) == text, "run: python -m pipeline.config --update-readme"


@pytest.mark.parametrize(
    "flags,gpus,expect",
    [
        ([], 0, False),
        ([], 2, True),
        ([], 4, True),
        ([], 1, "pass --cluster.num-workers 1 to train on the GPU(s)"),
        (["--cluster.use-gpu", "no"], 2, False),
        (["--cluster.use-gpu", "yes"], 2, True),
        (["--cluster.use-gpu", "yes"], 1, "asks for 2 GPU worker(s) but the cluster has 1"),
        (["--train.precision", "bf16"], 2, True),
        (["--train.precision", "bf16"], 0, "needs GPU workers"),
        (["--train.precision", "bf16", "--cluster.use-gpu", "no"], 2, "needs GPU workers"),
    ],
)
def test_device_choice_for_the_clusters_gpus(flags, gpus, expect):
    from pipeline.cluster import DeviceError
    from pipeline.train.launch import choose_device

    settings = Settings.from_cli(["--cluster.num-workers", "2", *flags])
    if isinstance(expect, str):
        with pytest.raises(DeviceError, match=re.escape(expect)):
            choose_device(settings, gpus)
    else:
        assert choose_device(settings, gpus) is expect


@pytest.mark.parametrize("name", ["../escaped", "a/b", ".hidden", "-x", "", "x" * 101, "a b", "ü"])
def test_run_names_outside_the_rule_exit_2_naming_it(name, capsys):
    from jobs.train import main

    assert main([f"--train.run-name={name}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "train.run_name" in err and "letters, digits" in err


@pytest.mark.parametrize("name", ["a", "run-1.2_x", "9" * 100])
def test_run_names_inside_the_rule_are_kept(name):
    assert Settings.from_cli(["--train.run-name", name]).train.run_name == name


def test_quality_options_are_checked_where_they_are_set():
    s = Settings.from_cli(["--train.loss-weighting", "min_snr", "--train.lr-schedule", "cosine"])
    assert (s.train.loss_weighting, s.train.min_snr_gamma, s.train.lr_schedule) == ("min_snr", 5.0, "cosine")
    with pytest.raises(ConfigError, match="lr_schedule=cosine needs train.total_images"):
        Settings.from_cli(["--train.lr-schedule", "cosine", "--train.total-images", "100"])
    with pytest.raises(ConfigError, match="loss_weighting"):
        Settings.from_cli(["--train.loss-weighting", "snr"])
