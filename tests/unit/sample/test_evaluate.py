"""The sampling job's settings, exit codes and names, without the stack (the job itself: tests/integration)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import sample as sample_job
from pipeline.config import Settings
from pipeline.ddpm.sampler import SamplerOptions
from pipeline.sample.plan import sampler_tag
from pipeline.sample.settings import SampleSettings

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def no_env_file(monkeypatch):
    """Settings resolved without a local stack's env.json (it would fill in the services)."""
    monkeypatch.delenv("DDPM_ENV_FILE", raising=False)


def test_help_runs_as_a_script():
    out = subprocess.run(
        [sys.executable, "jobs/sample.py", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for flag in ("--run-id", "--num-images", "--batch-size", "--chunk", "--sample.method", "--sample.steps",
                 "--sample.eta", "--sample.clip, --no-sample.clip", "--sample.variance", "--first-seed", "--workers",
                 "--checkpoint", "--ema, --no-ema", "--model", "--promote", "--image-size", "--dry-run", "--storage.endpoint-url", "--tracking.uri",
                 "--cluster.address"):  # fmt: skip
        assert flag in out.stdout, flag


@pytest.mark.parametrize(
    "argv,field",
    [
        ([], "run_id"),
        (["--run-id", "r", "--sample.method", "euler"], "sample.method"),
        (["--run-id", "r", "--sample.steps", "0"], "sample.steps"),
        (["--run-id", "r", "--checkpoint", "best"], "checkpoint"),
        (["--run-id", "r", "--name", "a/b"], "name"),
        (["--run-id", "r", "--workers", "0"], "workers"),
        (["--run-id", "r", "--model", "models:/m/1"], "exactly one"),
        (["--model", "runs:/abc/model"], "model"),
        (["--model", "models:/m@champion", "--promote", "champion", "--no-quality"], "promote"),
        (["--run-id", "r", "--promote", "champion"], "promote"),
        (["--model", "models:/m/1", "--promote", "a b"], "promote"),
    ],
)
def test_config_errors_exit_2_naming_the_field(argv, field, capsys):
    assert sample_job.main(argv) == 2
    assert field in capsys.readouterr().err


def test_dry_run_prints_the_settings(capsys, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    assert sample_job.main(["--run-id", "abc", "--no-ema", "--sample.method", "ancestral", "--dry-run"]) == 0
    out = capsys.readouterr().out
    d = json.loads(out[out.index("{") :])
    assert (d["run_id"], d["ema"], d["sample"]["method"]) == ("abc", False, "ancestral")
    assert "very-secret" not in out


def test_one_sampling_section_with_the_job_default_in_one_place():
    """Training grids default to ancestral; the sampling job overrides only the method, to DDIM-50."""
    assert Settings.from_cli([]).sample.method == "ancestral"
    job = SampleSettings.from_cli(["--run-id", "r"]).sample
    assert type(job) is type(Settings.from_cli([]).sample)
    assert (job.method, job.steps, job.eta, job.clip) == ("ddim", 50, 0.0, True)
    # Setting one field keeps the job's default for the others.
    assert SampleSettings.from_cli(["--run-id", "r", "--sample.steps", "10"]).sample.method == "ddim"
    assert job.options("v") == SamplerOptions("ddim", 50, 0.0, "fixed_small", True, "v")
    assert Settings.from_cli([]).sample.options("eps").steps is None  # ancestral visits all T


def test_sampler_tags_name_the_settings():
    assert sampler_tag(SamplerOptions("ddim", 50), 50, ema=True) == "ddim50-ema"
    assert sampler_tag(SamplerOptions("ddim", 20, eta=0.5, clip=False), 20, ema=False) == "ddim20-eta0.5-noclip-raw"
    assert sampler_tag(SamplerOptions("ancestral", variance="fixed_large"), 1000, ema=True) == "ancestral1000-large-ema"
