"""Fault injection on the real stack: storage outages, unusable checkpoints, permanent errors.

Each test trains the `tiny` U-Net on the digits shards (8x8) with 2 Ray Train workers through
`ray job submit`, injects one fault, and checks the run's outcome, the MLflow run state and step
history, and the checkpoints left in storage. Services are stopped and restarted through infra.stack's
own API, and always brought back (healthy) in a finalizer: other pytest sessions share this stack.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from tests.integration.test_train_job import COMMON, digits_shards, history, mlflow_run, s3_checkpoints, submit

pytestmark = [pytest.mark.stack, pytest.mark.faults]
__all__ = ["digits_shards"]  # the module-scoped fixture, shared with test_train_job


@pytest.fixture
def restores(stack):
    """Brings every stopped service back and waits until it answers, whatever the test did."""
    yield
    stack.stack.up(timeout=240)
    assert all(stack.stack._healthy(n) for n in ("s3", "mlflow")), "the stack did not come back healthy"


def _outage(stack, service: str, after, seconds: float, log: list):
    """Once ``after()`` holds: stop ``service`` by its PIDs for ``seconds``, then start it again."""

    def run():
        while not after():
            time.sleep(0.5)
        t0 = time.monotonic()
        stack.stack.down(services=[service])
        log.append(("down", t0))
        time.sleep(seconds)
        stack.stack.up(timeout=240, services=[service])
        log.append(("up", time.monotonic()))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _checkpoint_names(env, name):
    return sorted({k.split("/")[2] for k in s3_checkpoints(env, name) if k.endswith("/meta.json")})


def _no_duplicate_steps(client, run_id, total):
    steps = [s for s, _ in history(client, run_id, "train/images_seen")]
    assert steps == sorted(set(steps)), "duplicate or backwards MLflow steps"
    assert steps[-1] >= total


def test_s3_outage_mid_run_is_ridden_through(stack, digits_shards, restores):
    name = f"fault-s3-{uuid.uuid4().hex[:6]}"
    events: list = []
    first_checkpoint = lambda: bool(_checkpoint_names(stack.env, name))  # noqa: E731
    outage = _outage(stack, "s3", first_checkpoint, 20, events)
    args = COMMON + ["--train.run-name", name, "--train.total-images", "3200", "--storage.outage-s", "120"]
    t0 = time.monotonic()
    status, logs = submit(stack.env, args)
    outage.join(timeout=300)
    assert [e for e, _ in events] == ["down", "up"], logs[-3000:]
    assert status == "SUCCEEDED", logs[-4000:]
    assert "restored" not in logs, "the outage restarted the worker group instead of being ridden through"
    client, run = mlflow_run(stack.env, name)
    assert run.info.status == "FINISHED"
    _no_duplicate_steps(client, run.info.run_id, 3200)
    names = _checkpoint_names(stack.env, name)
    assert len(names) == 2 and names[-1].startswith("images_000000003200"), names
    print(f"FIGURE s3 outage 20 s: run {time.monotonic() - t0:.0f} s, images redone 0")


def test_planted_pickle_checkpoint_falls_back_and_keeps_two(stack, digits_shards):
    import hashlib
    import io
    import json

    import boto3
    import torch

    name = f"fault-pickle-{uuid.uuid4().hex[:6]}"
    args = COMMON + ["--train.run-name", name, "--train.total-images", "1280"]
    status, logs = submit(stack.env, args)
    assert status == "SUCCEEDED", logs[-3000:]
    names = _checkpoint_names(stack.env, name)
    assert len(names) == 2
    # An attacker with write access replaces the newest checkpoint with a pickle payload and a matching sha256.
    buf = io.BytesIO()
    torch.save({"model": {"x": set()}}, buf)  # a set is not allowed by weights_only loading
    data = buf.getvalue()
    env = stack.env
    s3 = boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
    )  # fmt: skip
    key = f"runs/{name}/{names[-1]}"
    meta = json.loads(s3.get_object(Bucket="ddpm-checkpoints", Key=f"{key}/meta.json")["Body"].read())
    meta |= {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    s3.put_object(Bucket="ddpm-checkpoints", Key=f"{key}/checkpoint.pt", Body=data)
    s3.put_object(Bucket="ddpm-checkpoints", Key=f"{key}/meta.json", Body=json.dumps(meta).encode())
    args = COMMON + ["--train.run-name", name, "--train.total-images", "1920", "--train.resume"]
    status, logs = submit(stack.env, args)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "unusable checkpoint" in logs and "restored" in logs
    left = _checkpoint_names(stack.env, name)
    # The fallback run writes new-generation names; the planted one is gone, two good ones remain.
    assert names[-1] not in left and len(left) == 2 and all(n.endswith("-g1") for n in left), left
    client, run = mlflow_run(stack.env, name)
    assert run.info.status == "FINISHED"


def test_strict_mode_bad_shard_fails_at_once_and_marks_the_run_failed(stack, digits_shards):
    import boto3

    env = stack.env
    s3 = boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
    )  # fmt: skip
    url = "s3://ddpm-data/test-faults-corrupt"
    src = digits_shards.removeprefix("s3://ddpm-data/")
    for obj in s3.list_objects_v2(Bucket="ddpm-data", Prefix=src + "/")["Contents"]:
        body = s3.get_object(Bucket="ddpm-data", Key=obj["Key"])["Body"].read()
        if obj["Key"].endswith(".tar") and "/train/" in obj["Key"]:
            body = body[: len(body) // 2]  # truncated shards
        s3.put_object(Bucket="ddpm-data", Key=obj["Key"].replace(src, "test-faults-corrupt", 1), Body=body)
    name = f"fault-strict-{uuid.uuid4().hex[:6]}"
    args = [a if a != digits_shards else url for a in COMMON] + [
        "--train.run-name", name, "--train.total-images", "1280", "--data.strict", "--cluster.max-failures", "3",
    ]  # fmt: skip
    t0 = time.monotonic()
    status, logs = submit(stack.env, args)
    assert status == "FAILED", logs[-3000:]
    assert "not retried" in logs and "ShardError" in logs
    assert logs.count("restored") == 0 and "[FailurePolicy] RETRY" not in logs
    client, run = mlflow_run(stack.env, name)
    assert run.info.status == "FAILED" and "ShardError" in run.data.tags["ddpm.failure_reason"]
    print(f"FIGURE strict shard error: failed in {time.monotonic() - t0:.0f} s, no retries")
