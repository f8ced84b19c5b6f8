"""The trained model as a registered MLflow Model, on the real local stack. No mocks.

Two tiny U-Nets are trained in-process on the digits (a good one, 100 steps, and a poor one, 3 steps)
and logged and registered the way the training job does (``benchmarks.local_run`` calls the
training job's ``pipeline.registry.register``): versions 1 and 2 of one registered model. The module
then loads a version by ``models:/`` URI in a fresh Python process, evaluates versions with
``jobs/sample.py --model ... --promote champion``, and asks for what does not exist.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import local_run
from jobs import prepare_data
from jobs import sample as sample_job
from pipeline.registry import evaluate_model
from pipeline.sample.evaluate import evaluate
from pipeline.sample.settings import SampleSettings

pytestmark = pytest.mark.stack

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEDULE = {"kind": "linear", "num_timesteps": 100, "beta_start": 1e-3, "beta_end": 0.2, "cosine_s": 0.008}
CHUNK = 8
N = 20
FAST = [
    "--sample.method",
    "ddim",
    "--sample.steps",
    "10",
    "--chunk",
    str(CHUNK),
    "--no-progress",
    "--num-images",
    str(N),
]


@pytest.fixture(scope="module")
def env(module_stack_env):
    return module_stack_env


@pytest.fixture(scope="module")
def registry(env, s3):
    """Versions 1 (trained 100 steps) and 2 (3 steps) of a registered model named for this module."""
    url = f"{s3.root}/digits"
    assert prepare_data.main(["--out", url, "--eval-fraction", "0.2", "--no-progress"]) == 0
    uri, name = env["MLFLOW_TRACKING_URI"], f"test-ddpm-{uuid.uuid4().hex[:8]}"
    runs, seconds = [], []
    for steps in (100, 3):
        state = local_run.train_locally(
            url, s3.storage, preset="tiny", schedule=SCHEDULE, steps=steps, batch_size=32, lr=3e-3, threads=1
        )
        t0 = time.perf_counter()
        runs.append(
            local_run.log_as_training_run(state, tracking_uri=uri, data_url=url, preset="tiny", register_as=name)
        )
        seconds.append(time.perf_counter() - t0)
    print(f"log + register, per run (s): {[round(s, 1) for s in seconds]}")
    return SimpleNamespace(url=url, uri=uri, name=name, runs=runs)


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _evaluate(*args) -> dict:
    s = SampleSettings.from_cli([*FAST, *args])
    return evaluate_model(s) if s.model else evaluate(s)


def _npz_images(uri, run_id, summary, tmp_path) -> np.ndarray:
    local = _client(uri).download_artifacts(
        run_id, summary["artifacts"]["samples.npz"], str(tmp_path / uuid.uuid4().hex)
    )
    with np.load(local) as z:
        return z["images"]


def test_each_finished_run_registers_a_tagged_version(registry):
    client = _client(registry.uri)
    versions = sorted(client.search_model_versions(f"name = '{registry.name}'"), key=lambda v: int(v.version))
    assert [v.version for v in versions] == ["1", "2"]
    assert [v.run_id for v in versions] == registry.runs
    tags = versions[0].tags
    assert tags["ddpm.data_url"] == registry.url and tags["ddpm.preset"] == "tiny"
    assert (tags["ddpm.image_size"], tags["ddpm.channels"], tags["ddpm.objective"]) == ("8", "1", "eps")
    assert tags["ddpm.images_seen"] == "3200" and tags["ddpm.checkpoint"] == "checkpoints/images_000000003200.pt"
    # The model belongs to the training run: a logged model with its signature and input example.
    from mlflow.models import get_model_info

    info = get_model_info(f"models:/{registry.name}/1")
    assert info.run_id == registry.runs[0]
    assert info.signature.inputs.input_names() == ["seed"]
    assert {p.name for p in info.signature.params} >= {"method", "steps", "eta", "clip", "chunk"}
    assert info.saved_input_example_info is not None
    from mlflow.models import Model

    print(f"model size: {Model.load(f'models:/{registry.name}/1').model_size_bytes} bytes")


def test_promotion_only_when_better_and_the_model_samples_as_the_job(registry, tmp_path):
    name, uri = registry.name, registry.uri
    poor = _evaluate("--model", f"models:/{name}/2", "--promote", "champion", "--name", "v2-first")
    assert poor["promotion"]["promoted"] and "no version held" in poor["promotion"]["reason"]
    assert poor["run_id"] == registry.runs[1] and poor["model"] == {
        "uri": f"models:/{name}/2",
        "name": name,
        "version": "2",
    }

    good = _evaluate("--model", f"models:/{name}/1", "--promote", "champion", "--name", "v1")
    assert good["promotion"]["promoted"], good["promotion"]
    assert (
        good["promotion"]["holder"]["version"] == "2"
        and good["promotion"]["value"] < good["promotion"]["holder"]["value"]
    )
    assert _client(uri).get_model_version_by_alias(name, "champion").version == "1"

    again = _evaluate("--model", f"models:/{name}/2", "--promote", "champion", "--name", "v2-again")
    assert not again["promotion"]["promoted"], again["promotion"]
    assert _client(uri).get_model_version_by_alias(name, "champion").version == "1"  # the worse one did not move it
    # The evaluation of a version lands in the version's source run.
    assert any(f.path == "eval/v1" for f in _client(uri).list_artifacts(registry.runs[0], "eval"))

    # A fresh process (no Ray, no S3 keys) loads the model by version and by alias and makes the same bytes.
    job_images = _npz_images(uri, registry.runs[0], good, tmp_path)
    out = tmp_path / "pyfunc.npz"
    code = f"""
import sys, numpy as np, pandas as pd, mlflow
seeds = pd.DataFrame({{"seed": list(range({N}))}})
params = {{"method": "ddim", "steps": 10, "chunk": {CHUNK}}}
by_version = mlflow.pyfunc.load_model("models:/{name}/1").predict(seeds, params=params)
by_alias = mlflow.pyfunc.load_model("models:/{name}@champion").predict(seeds, params=params)
assert "ray" not in sys.modules
np.savez({str(out)!r}, by_version=by_version, by_alias=by_alias)
"""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=child_env)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(out) as z:
        assert z["by_version"].dtype == np.uint8 and z["by_version"].shape == (N, 8, 8, 1)
        np.testing.assert_array_equal(z["by_version"], job_images)
        np.testing.assert_array_equal(z["by_alias"], job_images)


def test_bad_model_uris_and_sizes_fail_clearly(registry, capsys):
    name = registry.name
    assert sample_job.main(["--model", f"models:/{name}/99", *FAST, "--no-quality"]) == 1
    err = capsys.readouterr().err
    assert f"models:/{name}/99" in err and "version 99" in err and "versions 1, 2" in err

    assert sample_job.main(["--model", f"models:/{name}@nobody", *FAST, "--no-quality"]) == 1
    err = capsys.readouterr().err
    assert "@nobody" in err and "versions 1, 2" in err

    assert sample_job.main(["--model", "models:/no-such-model-here/1", *FAST, "--no-quality"]) == 1
    err = capsys.readouterr().err
    assert "no-such-model-here" in err and name in err  # what exists is listed

    assert sample_job.main(["--model", f"models:/{name}/1", "--image-size", "16", *FAST, "--no-quality"]) == 1
    err = capsys.readouterr().err
    assert "8x8x1" in err and "16x16" in err and "1 (8 px)" in err

    assert sample_job.main(["--model", f"models:/{name}/1", "--promote", "champion", "--no-quality", *FAST]) == 2
    assert "promote" in capsys.readouterr().err


def test_registered_model_page_in_headless_chromium(registry, env, tmp_path):
    """What a logged-in user sees: the registered model's page lists its versions."""
    from tests.integration.ui import chromium_flags, logged_in

    with logged_in(env) as ui:
        page = f"{ui}/#/models/{registry.name}"
        dom = subprocess.run(
            [*chromium_flags(tmp_path / "profile"), "--dump-dom", page], capture_output=True, text=True, timeout=120
        ).stdout
    assert registry.name in dom, "the registered model page did not render"
    assert "Version 1" in dom and "Version 2" in dom, "the page does not list the versions"
