"""jobs/sample.py against the real local stack: a real training run in MLflow, Ray actors, S3 data. No mocks.

The module trains a ``tiny`` U-Net for a few seconds on the digits (written to the test S3 by the
data layer's prepare_data job) with a 100-step schedule, logs it as the training job does (tag,
params, config.json, checkpoints/images_<N>.pt; ``benchmarks.local_run``), then evaluates it.
What needs no stack is in tests/unit/sample.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks import local_run
from jobs import prepare_data
from jobs import sample as sample_job
from pipeline.sample import evaluate
from pipeline.sample.settings import SampleSettings
from tests.integration.ui import logged_in

REPO_ROOT = Path(__file__).resolve().parents[2]

SCHEDULE = {"kind": "linear", "num_timesteps": 100, "beta_start": 1e-3, "beta_end": 0.2, "cosine_s": 0.008}
CHUNK = 8  # model calls of 8 images in every run below, so images can be compared byte for byte
FAST = ["--sample.method", "ddim", "--sample.steps", "10", "--chunk", str(CHUNK), "--no-progress"]


@pytest.fixture(scope="module")
def env(module_stack_env):
    return module_stack_env


@pytest.fixture(scope="module")
def trained(env, s3):
    """A tiny model trained here on digits written under the module's S3 prefix (deleted with it;
    the MLflow runs stay, as a training job's would)."""
    url = f"{s3.root}/digits"
    assert prepare_data.main(["--out", url, "--eval-fraction", "0.2", "--no-progress"]) == 0
    state = local_run.train_locally(
        url, s3.storage, preset="tiny", schedule=SCHEDULE, steps=100, batch_size=32, lr=3e-3, threads=1
    )
    run_id = _log_run(env["MLFLOW_TRACKING_URI"], state, url)
    return SimpleNamespace(url=url, run_id=run_id, state=state, uri=env["MLFLOW_TRACKING_URI"])


def _log_run(uri, state, url, *, checkpoint=True) -> str:
    return local_run.log_as_training_run(state, tracking_uri=uri, data_url=url, preset="tiny", checkpoint=checkpoint)


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _evaluate(trained, *args) -> dict:
    return evaluate.evaluate(SampleSettings.from_cli(["--run-id", trained.run_id, *FAST, *args]))


def _npz(trained, summary, tmp_path) -> dict[str, np.ndarray]:
    local = _client(trained.uri).download_artifacts(
        trained.run_id, summary["artifacts"]["samples.npz"], str(tmp_path / uuid.uuid4().hex)
    )
    with np.load(local) as z:
        return {k: z[k] for k in z.files}


def _expected(trained, seeds) -> np.ndarray:
    """The images of ``seeds`` computed here, in this process, as an actor computes them."""
    from pipeline.checkpoint import load_sampling_export, model_for_sampling, sampling_export
    from pipeline.ddpm.sampler import SamplerOptions, sample, to_uint8
    from pipeline.ddpm.schedule import NoiseSchedule
    from pipeline.sample.pool import FixedShapeCalls

    state = load_sampling_export(sampling_export(trained.state.state_dict()))
    model = FixedShapeCalls(model_for_sampling(state, ema=True), CHUNK)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors
    try:
        x = sample(model, NoiseSchedule.from_dict(SCHEDULE), seeds, (1, 8, 8), SamplerOptions("ddim", steps=10))
    finally:
        torch.set_num_threads(threads)
    return to_uint8(x)


@pytest.mark.stack
def test_fanout_is_seed_addressed_and_lands_in_the_run(trained, tmp_path):
    one = _evaluate(trained, "--num-images", "20", "--batch-size", "7", "--workers", "1", "--name", "w1-b7")
    two = _evaluate(
        trained, "--num-images", "20", "--batch-size", "4", "--workers", "2", "--name", "w2-b4", "--no-quality"
    )
    a, b = _npz(trained, one, tmp_path), _npz(trained, two, tmp_path)
    np.testing.assert_array_equal(a["seeds"], np.arange(20))
    np.testing.assert_array_equal(b["seeds"], np.arange(20))
    assert a["images"].dtype == np.uint8 and a["images"].shape == (20, 8, 8, 1)
    assert np.array_equal(a["images"], b["images"])  # byte-identical per seed: 1 vs 2 actors, batch 7 vs 4
    assert len({img.tobytes() for img in a["images"]}) == 20  # and different seeds differ
    np.testing.assert_array_equal(a["images"][[3, 11]], _expected(trained, [3, 11]))

    # The grid, served by the tracking server to a logged-in client.
    q = urllib.parse.urlencode({"path": one["artifacts"]["grid.png"], "run_uuid": trained.run_id})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with logged_in(os.environ) as ui, opener.open(f"{ui}/get-artifact?{q}", timeout=30) as r:
        assert r.status == 200
        png = r.read()
    from PIL import Image

    grid = Image.open(io.BytesIO(png))
    assert grid.format == "PNG" and grid.size == (5 * 34 + 2, 4 * 34 + 2)  # 20 images: 5 x 4 cells of 32 px

    # Metrics in the run, at the checkpoint's step; the JSON documents beside the images.
    client = _client(trained.uri)
    step = trained.state.images_seen
    metrics = client.get_run(trained.run_id).data.metrics
    for key in ("fd_digitcnn", "fd_digitcnn_floor", "images_per_s", "model_evals_per_image", "wall_s"):
        assert f"eval/ddim10-ema/{key}" in metrics, key
    hist = client.get_metric_history(trained.run_id, "eval/ddim10-ema/fd_digitcnn")
    assert len(hist) == 1 and hist[0].step == step and np.isfinite(hist[0].value) and hist[0].value > 0
    assert metrics["eval/ddim10-ema/model_evals_per_image"] == 10
    assert metrics["eval/ddim10-ema/digitcnn_eval_accuracy"] >= 0.9
    files = {f.path for f in client.list_artifacts(trained.run_id, "eval/w1-b7")}
    assert files == {f"eval/w1-b7/{n}" for n in ("grid.png", "samples.npz", "settings.json", "metrics.json")}
    settings = json.loads(
        Path(client.download_artifacts(trained.run_id, "eval/w1-b7/settings.json", str(tmp_path))).read_text()
    )
    assert settings["checkpoint"]["artifact"] == f"checkpoints/images_{step:012d}.pt"
    assert settings["sampler"]["method"] == "ddim" and settings["sampler"]["model_evals_per_image"] == 10
    assert settings["seeds"] == {"first": 0, "last": 19, "count": 20}
    assert settings["settings"]["storage"]["secret_access_key"] != os.environ["AWS_SECRET_ACCESS_KEY"]
    doc = json.loads(
        Path(client.download_artifacts(trained.run_id, "eval/w1-b7/metrics.json", str(tmp_path))).read_text()
    )
    assert doc["quality"]["feature_net"]["url"].startswith(trained.url + "/feature-net/")
    assert doc["cost"]["workers"] == 1 and two["metrics"]["eval/ddim10-ema/workers"] == 2


@pytest.mark.stack
def test_killed_actor_batches_are_rerun_every_seed_once(trained, tmp_path, monkeypatch):
    import ray

    killed: list[int] = []

    class CrashAfterFirstBatch(evaluate.SamplingPool):
        """The job's pool, with one actor killed by Ray (by its handle) once the first batch is in."""

        def run(self, batches, on_result):
            def first_then_crash(batch, images):
                on_result(batch, images)
                if not killed:
                    victim = next(slot for slot in self.slots if slot.alive and slot.ready)
                    ray.kill(victim.handle, no_restart=True)
                    killed.append(victim.number)

            return super().run(batches, first_then_crash)

    monkeypatch.setattr(evaluate, "SamplingPool", CrashAfterFirstBatch)
    out = _evaluate(
        trained,
        *("--num-images", "24", "--batch-size", "3", "--workers", "2", "--first-seed", "100", "--no-quality"),
        *("--name", "crash"),
    )
    assert killed
    assert out["metrics"]["eval/ddim10-ema/actor_failures"] == 1
    z = _npz(trained, out, tmp_path)
    np.testing.assert_array_equal(z["seeds"], np.arange(100, 124))  # every seed exactly once, in order
    np.testing.assert_array_equal(z["images"], _expected(trained, list(range(100, 124))))


@pytest.mark.stack
def test_unknown_run_id_fails_clearly(env):
    bad = "0123456789abcdef0123456789abcdef"
    out = subprocess.run(
        [sys.executable, "jobs/sample.py", "--run-id", bad],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180, env=os.environ.copy(),
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert bad in out.stderr and "not found" in out.stderr


@pytest.mark.stack
def test_runs_without_a_usable_checkpoint_fail_clearly(trained, capsys, tmp_path):
    no_ckpt = _log_run(trained.uri, trained.state, trained.url, checkpoint=False)
    assert sample_job.main(["--run-id", no_ckpt, *FAST]) == 1
    err = capsys.readouterr().err
    assert no_ckpt in err and "checkpoints/images_<N>.pt" in err

    assert sample_job.main(["--run-id", trained.run_id, "--checkpoint", "images_7", *FAST]) == 1
    err = capsys.readouterr().err
    assert "images_000000000007.pt" in err and f"images_{trained.state.images_seen:012d}.pt" in err

    assert sample_job.main(["--run-id", trained.run_id, "--sample.method", "ddim", "--sample.steps", "500"]) == 2
    assert "sample.steps" in capsys.readouterr().err

    # A checkpoint the code cannot rebuild: weights of another U-Net under the same name.
    from mlflow.tracking import MlflowClient

    from pipeline.checkpoint import sampling_export

    broken = _log_run(trained.uri, trained.state, trained.url, checkpoint=False)
    state = trained.state.state_dict()
    state["unet"] = {**state["unet"], "base_channels": 32}
    path = tmp_path / f"images_{1:012d}.pt"
    path.write_bytes(sampling_export(state))
    MlflowClient(trained.uri).log_artifact(broken, str(path), "checkpoints")
    assert sample_job.main(["--run-id", broken, *FAST]) == 1
    err = capsys.readouterr().err
    assert broken in err and "checkpoints/images_000000000001.pt" in err and "U-Net" in err


@pytest.mark.stack
def test_ray_job_submit(trained):
    cmd = [
        str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", os.environ["RAY_ADDRESS"],
        "--working-dir", str(REPO_ROOT), "--",
        "python", "jobs/sample.py", "--run-id", trained.run_id, "--num-images", "8", "--batch-size", "8",
        *FAST, "--no-quality", "--name", "submitted",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "eval/submitted/samples.npz" in out.stdout
    files = {f.path for f in _client(trained.uri).list_artifacts(trained.run_id, "eval/submitted")}
    assert "eval/submitted/samples.npz" in files
