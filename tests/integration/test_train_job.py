"""The training job end to end on the real stack: `ray job submit -- python jobs/train.py`.

Each run trains the `tiny` U-Net on the digits shards with 2 Ray Train workers (DDP over gloo).
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "jobs" / "train.py"
DATA_URL = "s3://ddpm-data/test-train-digits"

pytestmark = pytest.mark.stack

COMMON = [
    "--model.preset", "tiny",
    "--diffusion.num-timesteps", "100",
    "--data.url", DATA_URL,
    "--data.loader-workers", "1",
    "--train.batch-size", "32",
    "--train.checkpoint-every-images", "640",
    "--train.sample-every-images", "0",
    "--train.grid-size", "4",
    "--train.log-every-steps", "2",
    "--train.warmup-images", "320",
    "--train.lr", "1e-3",
    "--sample.method", "ddim",
    "--sample.steps", "10",
    "--cluster.num-workers", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def digits_shards(stack):
    env = {**os.environ, **stack.env}
    cmd = [sys.executable, str(REPO / "jobs/prepare_data.py"), "--out", DATA_URL, "--overwrite", "--no-progress"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
    return DATA_URL


def _jobs(env):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(env["RAY_ADDRESS"], headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})


def submit(env, args, *, on_running=None, timeout=420):
    """Submit the training job like a user would; returns (status, logs)."""
    client = _jobs(env)
    job_id = client.submit_job(entrypoint=f"python {shlex.quote(str(TRAIN))} {shlex.join(args)}")
    deadline = time.monotonic() + timeout
    while not (status := client.get_job_status(job_id)).is_terminal():
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"training job did not finish in {timeout} s:\n{client.get_job_logs(job_id)[-3000:]}")
        if on_running is not None and on_running():
            on_running = None
        time.sleep(1.0)
    return str(status), client.get_job_logs(job_id)


def mlflow_run(env, name):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("ddpm")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`ddpm.run_name` = '{name}'")
    assert len(runs) == 1, f"expected one MLflow run for {name}, found {len(runs)}"
    return client, runs[0]


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)]


def s3_checkpoints(env, name):
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    objs = s3.list_objects_v2(Bucket="ddpm-checkpoints", Prefix=f"runs/{name}/").get("Contents", [])
    return sorted({o["Key"] for o in objs})


def restored_images(logs) -> int | None:
    """Images seen by the checkpoint a worker group restored from, None if it restored none."""
    m = re.search(r"\] restored \S+ \((\d+) images seen\)", logs)
    return int(m[1]) if m else None


def furthest_progress(logs) -> int:
    """The most images a progress line reported before the first restore (or in all of ``logs``)."""
    before = logs.split("] restored ", 1)[0]
    return max((int(n.replace(",", "")) for n in re.findall(r"\[train\] ([\d,]+)/[\d,]+ images", before)), default=0)


def artifacts(client, run_id, path=None):
    out = []
    for a in client.list_artifacts(run_id, path):
        out += artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return out


@pytest.fixture(scope="module")
def uninterrupted(stack, digits_shards):
    name = f"test-a-{uuid.uuid4().hex[:6]}"
    args = COMMON + ["--train.run-name", name, "--train.total-images", "1600", "--train.progress-every-s", "1"]
    status, logs = submit(stack.env, args)
    assert status == "SUCCEEDED", logs[-4000:]
    return name, logs


def test_two_worker_run_checkpoints_and_tracks(stack, uninterrupted):
    name, logs = uninterrupted
    assert "world_size=2" in logs
    # What the operator reads: progress lines (the last at the total), no report dumps, no watcher error.
    assert "waiting for 2 Ray Train workers (1 CPU each)" in logs
    progress = [line for line in logs.splitlines() if "/1,600 images (" in line]
    assert progress and "| done |" in progress[-1] and "last checkpoint 1,6" in progress[-1], logs[-3000:]
    assert "\r" not in logs and "TrainingReport(" not in logs and "PreemptionWatcher" not in logs, logs[-3000:]
    keys = s3_checkpoints(stack.env, name)
    ckpt_dirs = sorted({k.split("/")[2] for k in keys if k.split("/")[2].startswith("images_")})
    assert len(ckpt_dirs) == 2, keys  # keep_checkpoints=2: the older ones were deleted
    assert {f"runs/{name}/{ckpt_dirs[-1]}/checkpoint.pt", f"runs/{name}/{ckpt_dirs[-1]}/meta.json"} <= set(keys)

    client, run = mlflow_run(stack.env, name)
    assert run.data.params["train.batch_size"] == "32" and run.data.params["world_size"] == "2"
    assert run.data.params["model.preset"] == "tiny"
    assert "**" in run.data.params["storage.secret_access_key"]  # masked, never the key
    loss = history(client, run.info.run_id, "train/loss")
    assert len(loss) >= 10 and all(v == v and v < 5 for _, v in loss)
    for key in ("train/lr", "train/grad_norm", "train/images_per_s", "train/loss_q1", "train/loss_q4"):
        assert history(client, run.info.run_id, key), key
    arts = artifacts(client, run.info.run_id)
    assert {"config.json", "provenance.json", "schedule/schedule.png", "schedule/schedule.json"} <= set(arts)
    assert any(a.startswith("samples/grid_") and a.endswith(".png") for a in arts), arts
    ckpts = [a for a in arts if a.startswith("checkpoints/images_") and a.endswith(".pt")]
    assert len(ckpts) == 3, arts  # 640, 1280 and the final one, each loadable for sampling
    local = client.download_artifacts(run.info.run_id, ckpts[-1])
    from pipeline.checkpoint import load_sampling_export, model_for_sampling

    state = load_sampling_export(local)
    assert state["images_seen"] >= 1600 and state["schedule"]["num_timesteps"] == 100
    model_for_sampling(state)
    prov = json.loads(Path(client.download_artifacts(run.info.run_id, "provenance.json")).read_text())
    assert prov["world_size"] == 2 and prov["packages"]["torch"] and prov["dataset_manifest_sha256"]
    # The finished run registered its model: a version of ddpm-<dataset> made from the final checkpoint.
    versions = client.search_model_versions(f"name = 'ddpm-test-train-digits' and run_id = '{run.info.run_id}'")
    assert len(versions) == 1 and versions[0].tags["ddpm.checkpoint"] == ckpts[-1], versions
    assert f"as models:/ddpm-test-train-digits/{versions[0].version}" in logs
    # The run page: data inputs with the manifest digest, source tags, a description, system metrics.
    inputs = {i.dataset.name: i for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
    train = inputs[f"{DATA_URL}/train"]
    assert train.dataset.digest == prov["dataset_manifest_sha256"] and DATA_URL in train.dataset.source
    assert [t.value for t in train.tags if t.key == "mlflow.data.context"] == ["training"]
    assert [t.value for t in inputs[f"{DATA_URL}/eval"].tags if t.key == "mlflow.data.context"] == ["evaluation"]
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["mlflow.source.name"] == "jobs/train.py" and tags["mlflow.source.type"] == "JOB"
    assert "mlflow.source.git.commit" in tags or prov["git_commit"] is None
    assert DATA_URL in tags["mlflow.note.content"] and "Final training loss" in tags["mlflow.note.content"]
    assert any(k.startswith("system/") for k in client.get_run(run.info.run_id).data.metrics)


def test_resume_equals_uninterrupted(stack, uninterrupted):
    """Stop after 640 images, resubmit with --train.resume: the losses that follow equal run A's."""
    name_a, _ = uninterrupted
    name = f"test-b-{uuid.uuid4().hex[:6]}"
    status, logs = submit(stack.env, COMMON + ["--train.run-name", name, "--train.total-images", "640"])
    assert status == "SUCCEEDED", logs[-4000:]
    # The second part runs as an elastic group (1-2 workers): on this 2-CPU cluster it gets both.
    elastic = ["--cluster.num-workers", "1-2", "--cluster.resize-interval-s", "5"]
    status, logs = submit(
        stack.env, COMMON + ["--train.run-name", name, "--train.total-images", "1600", "--train.resume", *elastic]
    )
    assert status == "SUCCEEDED", logs[-4000:]
    # The driver's own line; the workers' lines ("restored", "world_size=2") can reach the job log after
    # the job ended, so the restore and the group's size are checked in MLflow below.
    assert "waiting for 1-2 Ray Train workers" in logs, logs[-4000:]
    client, run_b = mlflow_run(stack.env, name)
    _, run_a = mlflow_run(stack.env, name_a)
    a = dict(history(client, run_a.info.run_id, "train/loss"))
    b = history(client, run_b.info.run_id, "train/loss")
    steps = [s for s, _ in b]
    assert steps == sorted(set(steps)), "duplicate or backwards metric steps after the resume"
    # Both runs log every 2nd step; B also logged where its first part ended.
    after = [(s, v) for s, v in b if s > 640 and s in a]
    assert len(after) >= 5
    # Same seeds, same data order, same RNG states: equal up to float summation order (gloo
    # all-reduce); stated tolerance 1e-4 relative.
    for s, v in after:
        assert v == pytest.approx(a[s], rel=1e-4), (s, v, a[s])
    # The elastic part gets the CPUs that are free when it starts: both, or one while the first part's
    # workers still hold theirs (then it may grow). Whatever it got, the losses above are equal, and each
    # change of size is in the metric and tagged.
    sizes = [v for _, v in history(client, run_b.info.run_id, "train/world_size")]
    assert sizes[0] == 2.0 and set(sizes) <= {1.0, 2.0}, sizes
    tags = client.get_run(run_b.info.run_id).data.tags.values()
    for old, new in {(int(a), int(b)) for a, b in zip(sizes, sizes[1:], strict=False) if a != b}:
        assert any(f"{old} -> {new} workers" in v for v in tags), (sizes, tags)


def test_killed_worker_resumes_from_last_checkpoint(stack, digits_shards):
    import psutil

    from pipeline.checkpoint import images_of

    name = f"test-c-{uuid.uuid4().hex[:6]}"
    killed, newest = [], []

    def kill_a_worker_after_first_checkpoint():
        written = [images_of(k.split("/")[2]) for k in s3_checkpoints(stack.env, name) if k.endswith("/meta.json")]
        if not written:
            return False
        newest[:] = [max(written)]
        for p in psutil.process_iter(["cmdline"]):
            try:
                if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and p.environ().get("DDPM_STACK_DIR") == str(
                    stack.config.state_dir
                ):
                    p.kill()
                    killed.append(p.pid)
                    return True
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return False

    args = COMMON + ["--train.run-name", name, "--train.total-images", "3200", "--cluster.max-failures", "2"]
    args += ["--train.progress-every-s", "1"]
    status, logs = submit(stack.env, args, on_running=kill_a_worker_after_first_checkpoint)
    assert killed, "no training worker was found to kill"
    assert status == "SUCCEEDED", logs[-4000:]
    # From the newest checkpoint: images redone below one checkpoint interval (+ the step that crossed it).
    restored = restored_images(logs)
    assert restored is not None and restored >= newest[0], (restored, newest)
    assert furthest_progress(logs) - restored <= 640 + 32, (furthest_progress(logs), restored)
    client, run = mlflow_run(stack.env, name)
    seen = history(client, run.info.run_id, "train/images_seen")
    steps = [s for s, _ in seen]
    assert steps == sorted(set(steps)), "duplicate or backwards MLflow steps after the restart"
    assert steps[-1] >= 3200
    # images-seen is continuous: the counter (value) always equals the step it is logged at.
    assert all(s == v for s, v in seen)


def test_existing_run_name_is_not_silently_resumed(stack, uninterrupted):
    name, _ = uninterrupted
    env = {**os.environ, **stack.env}
    r = subprocess.run(
        [sys.executable, str(TRAIN), *COMMON, "--train.run-name", name],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "already exists" in r.stderr and "--train.resume" in r.stderr
    r = subprocess.run(
        [sys.executable, str(TRAIN), *COMMON, "--train.run-name", "no-such-run", "--train.resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "no run named 'no-such-run'" in r.stderr


def test_devices_the_cpu_cluster_lacks_are_refused_before_tracking(stack, digits_shards):
    from mlflow.tracking import MlflowClient

    env = {**os.environ, **stack.env}
    cases = {
        "bf16": (["--train.precision", "bf16"], "train.precision=bf16 needs GPU workers"),
        "gpu": (["--cluster.use-gpu", "yes"], "cluster.use_gpu=yes asks for 2 GPU worker(s) but the cluster has 0"),
    }
    for key, (flags, message) in cases.items():
        name = f"test-device-{key}-{uuid.uuid4().hex[:6]}"
        r = subprocess.run(
            [sys.executable, str(TRAIN), *COMMON, "--train.run-name", name, *flags],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        exp = client.get_experiment_by_name("ddpm")
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`ddpm.run_name` = '{name}'") if exp else []
        assert runs == [] and s3_checkpoints(env, name) == []


def test_bad_config_exits_before_any_cluster_work(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1", "DDPM_STACK_DIR": str(tmp_path)}
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, str(TRAIN), "--diffusion.beta-start", "0.1", "--diffusion.beta-end", "0.01"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "diffusion.beta_end" in r.stderr and "beta_start" in r.stderr
    assert "ray" not in r.stdout.lower() and time.monotonic() - t0 < 30
    r = subprocess.run(
        [sys.executable, str(TRAIN), "--dry-run", "--train.batch-size", "64"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and '"batch_size": 64' in r.stdout


def test_mlflow_ui_shows_the_run_in_headless_chromium(stack, uninterrupted, tmp_path):
    """What a logged-in user sees: the run page lists the loss metric; the sample grid is served as an image."""
    import urllib.request

    from PIL import Image

    from tests.integration.ui import chromium_flags, logged_in

    name, _ = uninterrupted
    client, run = mlflow_run(stack.env, name)
    flags = chromium_flags(tmp_path / "profile")
    with logged_in(stack.env) as uri:
        page = f"{uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
        assert name in dom, "the run page did not render the run"
        assert "train/loss" in dom, "the run page does not list the loss metric"

        grid = next(a for a in artifacts(client, run.info.run_id) if a.startswith("samples/grid_"))
        url = f"{uri}/get-artifact?path={grid}&run_uuid={run.info.run_id}"
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.headers["Content-Type"].startswith("image/png")
            Image.open(io.BytesIO(r.read())).verify()
        # The artifact is sent as an attachment, so the browser shows it the way the MLflow UI does: in an <img>.
        page_html = tmp_path / "grid.html"
        page_html.write_text(
            f'<body style="margin:0;background:#808080"><img src="{url}" width="300" height="300"></body>'
        )
        shot = tmp_path / "grid.png"
        subprocess.run(
            [*flags, f"--screenshot={shot}", "--window-size=300,300", page_html.as_uri()],
            capture_output=True,
            timeout=120,
        )
    img = Image.open(shot).convert("L")
    assert img.getextrema() == (0, 255) or img.getextrema()[1] - img.getextrema()[0] > 150, (
        "the browser did not render the grid image (a blank grey page)"
    )
