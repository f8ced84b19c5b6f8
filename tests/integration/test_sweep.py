"""A sweep end to end on the real stack: `ray job submit -- python jobs/sweep.py`, interrupted and resumed.

Three trials of the `tiny` U-Net on the digits shards, one Ray Train worker each, one at a time
(grid over train.lr, so the order is fixed): t0 (1e-3) trains its whole budget and is evaluated;
t1 (3e-5) learns too slowly and ASHA stops it at the first rung against t0's loss there; t2 (100)
diverges before its first checkpoint, so its run fails (nothing to roll back to). The job is stopped
through the Jobs API once t0 has finished and the sweep's state says so; the resumed job does not
run t0 again, and ASHA still compares t1 with t0's rung (its rungs are part of the saved state).
"""

from __future__ import annotations

import json
import re
import shlex
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.test_train_job import DATA_URL, _jobs, digits_shards

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "jobs" / "sweep.py"

pytestmark = pytest.mark.stack
__all__ = ["digits_shards"]  # the module-scoped fixture, shared with test_train_job

FLAGS = [
    "--model.preset", "tiny",
    "--diffusion.num-timesteps", "100",
    "--data.url", DATA_URL,
    "--data.loader-workers", "0",
    "--train.batch-size", "32",
    "--train.total-images", "1024",
    "--train.warmup-images", "64",
    "--train.checkpoint-every-images", "512",
    "--train.sample-every-images", "0",
    "--train.grid-size", "4",
    "--train.log-every-steps", "4",
    "--train.validate-every-images", "256",
    "--train.validate-images", "64",
    "--cluster.num-workers", "1",
    "--cluster.max-failures", "0",
    "--sweep.space", "{train.lr: {grid: [1.0e-3, 3.0e-5, 100.0]}}",
    "--sweep.grace-images", "256",
    "--sweep.reduction-factor", "2",
    "--sweep.eval-images", "64",
    "--sweep.eval-steps", "10",
    "--sweep.state-every-s", "1",
]  # fmt: skip


def _wait(client, job_id, timeout: float, until=None) -> str:
    """Poll the job until it ends (or ``until(logs)`` holds); returns its logs."""
    deadline = time.monotonic() + timeout
    while True:
        logs = client.get_job_logs(job_id)
        if client.get_job_status(job_id).is_terminal() or (until is not None and until(logs)):
            return logs
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"sweep job did not get there in {timeout} s:\n{logs[-4000:]}")
        time.sleep(1.0)


def _s3(env):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


def _objects(env, prefix: str) -> list[str]:
    pages = _s3(env).get_paginator("list_objects_v2").paginate(Bucket="ddpm-checkpoints", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def saved_statuses(env, name: str) -> dict[str, str]:
    """Trial index -> status in the newest sweep state Ray Tune saved (what a resume starts from)."""
    states = sorted(k for k in _objects(env, f"sweeps/{name}/") if k.rsplit("/", 1)[-1].startswith("experiment_state"))
    if not states:
        return {}
    doc = json.loads(_s3(env).get_object(Bucket="ddpm-checkpoints", Key=states[-1])["Body"].read())
    trials = [json.loads(t) if isinstance(t, str) else t for t, _ in doc["trial_data"]]
    return {f"t{int(t['trial_id'].rsplit('_', 1)[-1])}": t["status"] for t in trials}


def test_sweep_stops_fails_ranks_and_resumes(stack, digits_shards):
    from mlflow.tracking import MlflowClient

    env, name = stack.env, f"test-sweep-{uuid.uuid4().hex[:6]}"
    jobs = _jobs(env)
    entry = f"python {shlex.quote(str(SWEEP))} {shlex.join([*FLAGS, '--sweep.name', name])}"

    # 1. Run until t0 has finished and the saved state has it, then stop the job as an operator would.
    job = jobs.submit_job(entrypoint=entry)
    logs = _wait(jobs, job, 240, until=lambda logs: f"[sweep] trial {name}-t0 finished" in logs)
    assert f"[sweep] trial {name}-t0 finished" in logs, logs[-4000:]
    deadline = time.monotonic() + 30
    while saved_statuses(env, name).get("t0") != "TERMINATED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert saved_statuses(env, name)["t0"] == "TERMINATED"
    jobs.stop_job(job)
    logs = _wait(jobs, job, 60)
    assert str(jobs.get_job_status(job)) == "STOPPED", logs[-3000:]
    assert "ASHA on val_loss: rungs at 256, 512 images (budget 1,024)" in logs
    assert "at rung 256 images" in logs and "first at this rung: continues" in logs

    mlflow = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = mlflow.get_experiment_by_name("ddpm").experiment_id
    (parent,) = mlflow.search_runs([exp], f"tags.`ddpm.sweep` = '{name}'")

    def children() -> dict:
        runs = mlflow.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        return {r.data.tags["sweep.trial"]: r for r in runs}

    t0 = children()["t0"]
    assert t0.info.status == "FINISHED" and t0.data.tags["sweep.status"] == "finished"
    fd_key = next(k for k in t0.data.metrics if re.fullmatch(r"eval/ddim10-ema/fd_[a-z0-9]+", k))
    t0_history = {k: len(mlflow.get_metric_history(t0.info.run_id, k)) for k in ("train/loss", fd_key)}

    # 2. Resumed: the same command with --sweep.resume.
    job = jobs.submit_job(entrypoint=f"{entry} --sweep.resume")
    logs = _wait(jobs, job, 240)
    assert str(jobs.get_job_status(job)) == "SUCCEEDED", logs[-5000:]
    assert f"resuming sweep {name!r}" in logs
    assert f"[sweep] trial {name}-t0 (" not in logs  # finished trials are not run again
    assert f"[sweep] trial {name}-t1 (train.lr=3e-05)" in logs
    # t1 is judged against t0's loss at the rung, recorded before the interruption.
    assert "at rung 256 images" in logs and ": stopped" in logs and "first at this rung" not in logs

    runs = children()
    assert set(runs) == {"t0", "t1", "t2"}
    t0, t1, t2 = runs["t0"], runs["t1"], runs["t2"]
    assert {k: len(mlflow.get_metric_history(t0.info.run_id, k)) for k in t0_history} == t0_history
    assert t1.info.status == "KILLED" and t1.data.tags["sweep.status"] == "stopped_early"
    assert t1.data.tags["ddpm.failure_reason"].startswith("stopped early by ASHA at")
    assert "256: " in t1.data.tags["sweep.rungs"] and t1.data.tags["sweep.rungs"].endswith("stopped")
    assert t2.info.status == "FAILED" and t2.data.tags["sweep.status"] == "failed"
    assert "training diverged" in t2.data.tags["ddpm.failure_reason"]

    # The best is the one finished trial, marked on it and on the parent, consistent with the FDs.
    fd = t0.data.metrics[fd_key]
    assert [r.data.tags["sweep.best"] for r in (t0, t1, t2)] == ["true", "false", "false"]
    parent = mlflow.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.best_trial"] == "t0" and parent.data.tags["sweep.best.train.lr"] == "0.001"
    assert parent.data.metrics["best/fd"] == pytest.approx(fd)
    assert json.loads(parent.data.params["space.train.lr"]) == {"grid": [0.001, 3e-05, 100.0]}
    assert parent.data.params["train.total_images"] == "1024"
    results = json.loads(Path(mlflow.download_artifacts(parent.info.run_id, "sweep_results.json")).read_text())
    table = {r["trial"]: r for r in results["trials"]}
    assert {t: r["status"] for t, r in table.items()} == {"t0": "finished", "t1": "stopped_early", "t2": "failed"}
    assert table["t0"]["fd"] == pytest.approx(fd) and table["t0"]["images_seen"] >= 1024 and table["t0"]["best"]
    assert table["t1"]["images_seen"] < 512 and "training diverged" in table["t2"]["error"]
    assert f"best trial: {name}-t0 (fd {fd:.4g}); its settings: --train.lr 0.001" in logs
    assert f"SWEEP_RUN_ID={parent.info.run_id}" in logs

    # The sweep's state and the trials' runs are in the run storage, without the S3 secret.
    state = _objects(env, f"sweeps/{name}/")
    assert any(k.endswith("tuner.pkl") for k in state)
    secret = env["AWS_SECRET_ACCESS_KEY"].encode()
    s3 = _s3(env)
    for key in state + _objects(env, f"runs/{name}-t"):
        assert secret not in s3.get_object(Bucket="ddpm-checkpoints", Key=key)["Body"].read(), key
