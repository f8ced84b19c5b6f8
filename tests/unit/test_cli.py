"""The jobs' shared preamble (pipeline/cli.py): what an operator sees first, exit codes, secret flags."""

import pytest

from pipeline.cli import JobError, refuse_secret_flags, run_job
from pipeline.config import ConfigError, Settings

SECRET = "s3cr3t-VALUE"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("DDPM_ENV_FILE", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)


@pytest.fixture
def in_ray_job(monkeypatch):
    """What ``ray job submit`` sets in the driver's environment (``pipeline.cluster.in_ray_job``)."""
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {}}')


def _never(*_):
    raise AssertionError("the job body ran")


@pytest.mark.parametrize(
    "argv",
    [
        ["--storage.secret-access-key", SECRET],
        [f"--storage.secret-access-key={SECRET}"],
        ["--storage.secret_access_key", SECRET],
        ["--storage", f'{{"secret_access_key": "{SECRET}"}}'],
    ],
)
def test_secret_flags_are_refused_inside_a_ray_job_naming_the_variable(argv, in_ray_job, capsys):
    assert run_job(Settings, _never, ["--train.batch-size", "32", *argv], prog="t") == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: --storage.secret-access-key is refused inside a Ray job")
    assert "AWS_SECRET_ACCESS_KEY" in err and "ray job list" in err
    assert SECRET not in out + err and out == ""


def test_secret_flags_are_accepted_outside_ray_jobs_and_never_printed(capsys):
    assert run_job(Settings, _never, ["--storage.secret-access-key", SECRET, "--dry-run"], prog="t") == 0
    out, err = capsys.readouterr()
    assert out.startswith("resolved configuration:") and SECRET not in out + err


def test_other_flags_and_env_secrets_pass_inside_a_ray_job(in_ray_job, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    refuse_secret_flags(Settings, ["--storage.access-key-id", "k", "--storage", '{"region": "eu-west-1"}'])
    ran = []
    assert run_job(Settings, lambda s: ran.append(s.storage.secret_access_key.get_secret_value()), [], prog="t") == 0
    assert ran == [SECRET]


def test_a_bad_flag_is_the_only_output(capsys):
    assert run_job(Settings, _never, ["--train.batch-size", "x"], prog="t") == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: invalid configuration:") and "train.batch_size" in err


def test_preflight_errors_come_before_the_configuration_and_dry_run_skips_preflight(capsys):
    def preflight(settings):
        raise ConfigError(f"error: a run named {settings.train.run_name!r} already exists")

    assert run_job(Settings, _never, ["--train.run-name", "r1"], prog="t", preflight=preflight) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: a run named 'r1' already exists\n"
    assert run_job(Settings, _never, ["--dry-run"], prog="t", preflight=_never) == 0
    assert capsys.readouterr().out.startswith("resolved configuration:")


def test_body_gets_preflights_result_and_a_later_error_is_the_last_marked_line(capsys):
    def body(settings, run_id):
        print(f"training {run_id}")
        raise JobError("training failed: WorkerGroupError: boom")

    assert run_job(Settings, body, [], prog="t", preflight=lambda s: "abc") == 1
    out, err = capsys.readouterr()
    assert out.startswith("resolved configuration:") and out.endswith("training abc\n")
    assert err.splitlines()[-1] == "error: training failed: WorkerGroupError: boom"
