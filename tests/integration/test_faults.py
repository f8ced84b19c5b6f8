"""Fault injection on the real stack: storage and tracking outages, unusable checkpoints, permanent errors.

Each test trains the `tiny` U-Net on the digits shards (8x8) with 2 Ray Train workers through
`ray job submit` (checkpoints every 640 images, 2 kept), injects one fault, and checks the run's
outcome, the images redone, the MLflow run state and step history, and the checkpoints left in
storage. Services are stopped and restarted through infra.stack's own API, and always brought back
(healthy) in a finalizer: other pytest sessions share this stack. Worker SIGKILL is
tests/integration/test_train_job.py::test_killed_worker_resumes_from_last_checkpoint. The figures
printed as ``FIGURE`` lines are those of docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
import uuid

import pytest

from pipeline.checkpoint import images_of
from tests.integration.test_train_job import (
    COMMON,
    REPO,
    TRAIN,
    _jobs,
    digits_shards,
    furthest_progress,
    history,
    mlflow_run,
    restored_images,
    s3_checkpoints,
    submit,
)

pytestmark = [pytest.mark.stack, pytest.mark.faults]
__all__ = ["digits_shards"]  # the module-scoped fixture, shared with test_train_job

EVERY = 640  # --train.checkpoint-every-images in COMMON
BATCH = 32  # --train.batch-size in COMMON: a checkpoint lands on the step that crosses a multiple of EVERY
ARGS = COMMON + ["--train.progress-every-s", "1"]


@pytest.fixture
def restores(stack):
    """Brings every stopped service back and waits until it answers, whatever the test did."""
    yield
    stack.stack.up(timeout=240)
    assert all(stack.stack._healthy(n) for n in ("s3", "mlflow")), "the stack did not come back healthy"


def _outage(stack, service: str, after, seconds: float, log: dict):
    """Once ``after()`` holds: stop ``service`` by its PIDs for ``seconds``, then start it again;
    ``log`` gets the times ``down`` and ``up`` (when it answers again), monotonic and ``*_wall``."""

    def run():
        deadline = time.monotonic() + 300
        while not after():
            if time.monotonic() > deadline:
                return
            time.sleep(0.3)
        log["down"], log["down_wall"] = time.monotonic(), time.time()
        stack.stack.down(services=[service])
        time.sleep(seconds)
        stack.stack.up(timeout=240, services=[service])
        log["up"], log["up_wall"] = time.monotonic(), time.time()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _run_through_outage(stack, service: str, seconds: float, name: str, extra: list[str]):
    """A 3,200-image run named ``name`` with ``service`` down for ``seconds`` after its first
    checkpoint; asserts it succeeded. Returns (logs, the outage's times, start, end)."""
    when: dict = {}
    outage = _outage(stack, service, lambda: bool(_checkpoint_names(stack.env, name)), seconds, when)
    t0 = time.monotonic()
    status, logs = submit(stack.env, ARGS + ["--train.run-name", name, "--train.total-images", "3200", *extra])
    end = time.monotonic()
    outage.join(timeout=300)
    assert "up" in when, logs[-3000:]
    assert status == "SUCCEEDED", logs[-4000:]
    return logs, when, t0, end


def _s3(env):
    import boto3

    return boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
    )  # fmt: skip


def _checkpoint_names(env, name):
    """The run's complete checkpoints (meta.json written last), oldest first."""
    return sorted({k.split("/")[2] for k in s3_checkpoints(env, name) if k.endswith("/meta.json")})


def _step_history(client, run_id, total):
    """train/images_seen in MLflow: no duplicate or backward step, no gap, the counter equals its step,
    up to the total."""
    seen = history(client, run_id, "train/images_seen")
    steps = [s for s, _ in seen]
    assert steps == sorted(set(steps)), "duplicate or backwards MLflow steps"
    assert steps[-1] >= total and all(s == v for s, v in seen)
    gaps = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    assert max(gaps) <= 1.5 * statistics.median(gaps), f"a gap in the MLflow step history: {max(gaps)} images"
    return steps


def test_s3_outage_mid_run_is_ridden_through(stack, digits_shards, restores):
    name = f"fault-s3-{uuid.uuid4().hex[:6]}"
    logs, when, t0, end = _run_through_outage(stack, "s3", 20, name, ["--storage.outage-s", "120"])
    assert "[storage] waiting for" in logs, "the outage never reached the run"
    assert restored_images(logs) is None, "the outage restarted the worker group instead of being ridden through"
    client, run = mlflow_run(stack.env, name)
    assert run.info.status == "FINISHED"
    _step_history(client, run.info.run_id, 3200)
    names = _checkpoint_names(stack.env, name)
    assert len(names) == 2 and images_of(names[-1]) >= 3200, names
    print(
        f"FIGURE s3 outage {when['up'] - when['down']:.0f} s mid-run: survived, images redone 0, "
        f"run {end - t0:.0f} s, finished {end - when['up']:.0f} s after S3 was back"
    )


def test_s3_down_during_retention_postpones_it_and_never_fails(stack, restores, tmp_path, monkeypatch, capfd):
    """Retention (RunStorage.retain, right after each upload) with S3 gone: within storage.outage_s it
    waits and deletes; beyond it, it gives up quietly and the next retention catches up."""
    from pipeline.checkpoint import META_FILE, checkpoint_name
    from pipeline.config import Settings
    from pipeline.train.run_storage import RunStorage

    for k, v in stack.env.items():
        monkeypatch.setenv(k, v)
    settings = Settings.from_cli(["--storage.outage-s", "60"])
    name = f"fault-retain-{uuid.uuid4().hex[:6]}"
    run = RunStorage(settings, name, tmp_path)

    def write(images):
        d = tmp_path / checkpoint_name(images)
        d.mkdir()
        (d / "checkpoint.pt").write_bytes(b"\0" * 4096)
        (d / META_FILE).write_text("{}")
        return run.upload(d, d.name)

    paths = [write(n) for n in (640, 1280, 1920)]
    stack.stack.down(services=["s3"])
    back = threading.Thread(target=lambda: (time.sleep(5), stack.stack.up(timeout=240, services=["s3"])))
    t0 = time.monotonic()
    back.start()
    deleted = run.retain(2, paths[-1])
    waited = time.monotonic() - t0
    back.join()
    assert deleted == [paths[0]] and waited >= 5, (deleted, waited)
    assert "[storage] waiting for" in capfd.readouterr().err
    assert _checkpoint_names(stack.env, name) == [checkpoint_name(1280), checkpoint_name(1920)]

    run.storage = settings.storage.model_copy(update={"outage_s": 3.0})
    paths.append(write(2560))
    stack.stack.down(services=["s3"])
    try:
        t0 = time.monotonic()
        assert run.retain(2, paths[-1]) == []
        gave_up = time.monotonic() - t0
    finally:
        stack.stack.up(timeout=240, services=["s3"])
    assert "checkpoint retention postponed (StorageUnreachableError" in capfd.readouterr().out
    assert gave_up < 30, gave_up
    assert run.retain(2, paths[-1]) == [paths[1]]
    assert _checkpoint_names(stack.env, name) == [checkpoint_name(1920), checkpoint_name(2560)]
    print(
        f"FIGURE s3 down during retention: waited {waited:.0f} s and deleted; beyond outage_s gave up in {gave_up:.0f} s"
    )


def test_s3_outage_longer_than_outage_s_fails_clearly_and_resume_continues(stack, digits_shards, restores):
    name = f"fault-s3long-{uuid.uuid4().hex[:6]}"
    when: dict = {}
    outage = _outage(stack, "s3", lambda: bool(_checkpoint_names(stack.env, name)), 25, when)
    args = ARGS + ["--train.run-name", name, "--storage.outage-s", "5", "--cluster.max-failures", "0"]
    status, logs = submit(stack.env, args + ["--train.total-images", "12800"])
    failed = time.monotonic()
    outage.join(timeout=300)
    assert status == "FAILED", logs[-4000:]
    assert "error: training failed: " in logs and "StorageUnreachableError" in logs, logs[-3000:]
    assert re.search(r"unreachable for \d+ s while .*\(storage\.outage_s=5\)", logs), logs[-3000:]
    client, run = mlflow_run(stack.env, name)
    assert run.info.status == "FAILED" and "StorageUnreachableError" in run.data.tags["ddpm.failure_reason"]
    names = _checkpoint_names(stack.env, name)
    newest, reached = images_of(names[-1]), furthest_progress(logs)
    assert 0 < len(names) <= 2 and reached < 12800, (names, reached)

    total = newest + 2 * EVERY
    status, logs = submit(stack.env, args + ["--train.total-images", str(total), "--train.resume"])
    assert status == "SUCCEEDED", logs[-4000:]
    assert restored_images(logs) == newest, (names, logs[-3000:])
    assert reached - newest <= EVERY + BATCH, (reached, newest)
    client, run = mlflow_run(stack.env, name)
    assert run.info.status == "FINISHED" and "ddpm.failure_reason" not in run.data.tags
    _step_history(client, run.info.run_id, total)
    left = _checkpoint_names(stack.env, name)
    assert len(left) == 2 and images_of(left[-1]) >= total, left
    print(
        f"FIGURE s3 outage {when['up'] - when['down']:.0f} s > storage.outage_s=5: failed "
        f"{failed - when['down']:.0f} s after S3 went away; --train.resume redid {reached - newest} images"
    )


def _kill_a_training_worker(stack) -> int | None:
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        try:
            mine = p.environ().get("DDPM_STACK_DIR") == str(stack.config.state_dir)
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and mine:
                p.kill()
                return p.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_worker_group_restarted_while_s3_is_down_waits_for_it(stack, digits_shards, restores):
    """S3 stopped after the first checkpoint and a worker SIGKILLed while it is away: the restarted group's
    workers wait for S3 at their start (within storage.outage_s) instead of failing it, so the one
    allowed restart is enough; S3 comes back once they are seen waiting, and they restore the newest
    checkpoint and finish."""
    name = f"fault-s3start-{uuid.uuid4().hex[:6]}"
    when: dict = {}
    waiting = re.compile(r"\[hosts\] worker host .* waiting for S3 at (\S+) ")

    def job_logs() -> str:
        jobs = _jobs(stack.env)
        mine = [j for j in jobs.list_jobs() if name in (j.entrypoint or "")]
        return jobs.get_job_logs(mine[0].submission_id) if mine else ""

    def inject():
        deadline = time.monotonic() + 300
        while not _checkpoint_names(stack.env, name):
            if time.monotonic() > deadline:
                return
            time.sleep(0.3)
        when["newest"] = images_of(_checkpoint_names(stack.env, name)[-1])
        when["down"] = time.monotonic()
        stack.stack.down(services=["s3"])
        when["killed"] = _kill_a_training_worker(stack)
        while not waiting.search(job_logs()) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2.0)  # the restarted workers keep waiting meanwhile
        stack.stack.up(timeout=240, services=["s3"])
        when["up"] = time.monotonic()

    thread = threading.Thread(target=inject, daemon=True)
    thread.start()
    args = ARGS + ["--train.run-name", name, "--train.total-images", "1920", "--cluster.max-failures", "1"]
    status, logs = submit(stack.env, args + ["--storage.outage-s", "120"])
    thread.join(timeout=300)
    assert when.get("killed") and "up" in when, (when, logs[-3000:])
    assert status == "SUCCEEDED", logs[-4000:]
    waits = waiting.findall(logs)
    assert waits and waits[0] == stack.env["AWS_ENDPOINT_URL"], logs[-4000:]
    restored = restored_images(logs)
    assert restored is not None and restored >= when["newest"], (restored, when, logs[-3000:])
    assert furthest_progress(logs) - restored <= EVERY + BATCH
    client, run = mlflow_run(stack.env, name)
    assert run.info.status == "FINISHED"
    _step_history(client, run.info.run_id, 1920)
    print(
        f"FIGURE s3 down {when['up'] - when['down']:.0f} s while the worker group restarts: the workers waited, "
        f"finished with 1 restart; images redone {furthest_progress(logs) - restored}"
    )


def test_mlflow_restarted_mid_run_metrics_are_back_filled(stack, digits_shards, restores):
    name = f"fault-mlflow-{uuid.uuid4().hex[:6]}"
    logs, when, t0, end = _run_through_outage(stack, "mlflow", 5, name, [])
    assert restored_images(logs) is None
    client, run = mlflow_run(stack.env, name)
    assert run.info.status == "FINISHED"
    steps = _step_history(client, run.info.run_id, 3200)
    # Logged (time-stamped) while the server was away, sent once it was back.
    away = client.get_metric_history(run.info.run_id, "train/images_seen")
    away = [m.step for m in away if when["down_wall"] <= m.timestamp / 1000 <= when["up_wall"]]
    assert away, "the outage never reached the run"
    loss = [s for s, _ in history(client, run.info.run_id, "train/loss")]
    assert loss == sorted(set(loss)) and len(loss) == len(steps)
    # Every sampling checkpoint logged while MLflow was away arrived too.
    arts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert len(arts) == len(range(EVERY, 3200 + 1, EVERY)), arts
    assert len(_checkpoint_names(stack.env, name)) == 2
    print(
        f"FIGURE mlflow outage {when['up'] - when['down']:.0f} s mid-run: survived, images redone 0, "
        f"{len(away)} logs back-filled without gaps or duplicates, run {end - t0:.0f} s"
    )


def test_planted_pickle_and_flipped_byte_fall_back_past_both(stack, digits_shards):
    """The newest checkpoint replaced by a pickle payload with a matching sha256 (anyone who can write
    the bucket), the one before it with one byte flipped: the resume skips both, restores the third,
    and writes a new generation of names."""
    name = f"fault-ckpt-{uuid.uuid4().hex[:6]}"
    args = ARGS + ["--train.run-name", name, "--train.keep-checkpoints", "3"]
    status, logs = submit(stack.env, args + ["--train.total-images", "1920"])
    assert status == "SUCCEEDED", logs[-3000:]
    reached = furthest_progress(logs)
    names = _checkpoint_names(stack.env, name)
    assert len(names) == 3, names
    s3, bucket = _s3(stack.env), "ddpm-checkpoints"
    import torch

    buf = io.BytesIO()
    torch.save({"model": {"x": {1, 2}}}, buf)  # a set: refused by weights_only loading
    data = buf.getvalue()
    key = f"runs/{name}/{names[-1]}"
    meta = json.loads(s3.get_object(Bucket=bucket, Key=f"{key}/meta.json")["Body"].read())
    meta |= {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    s3.put_object(Bucket=bucket, Key=f"{key}/checkpoint.pt", Body=data)
    s3.put_object(Bucket=bucket, Key=f"{key}/meta.json", Body=json.dumps(meta).encode())
    key = f"runs/{name}/{names[-2]}/checkpoint.pt"
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x01
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))

    status, logs = submit(stack.env, args + ["--train.total-images", "2560", "--train.resume"])
    assert status == "SUCCEEDED", logs[-4000:]
    assert logs.count("unusable checkpoint") == 2, logs[-4000:]
    assert restored_images(logs) == images_of(names[0])
    left = _checkpoint_names(stack.env, name)
    # New-generation names only: the two unusable ones and the old good one are gone, three good ones remain.
    assert len(left) == 3 and all(n.endswith("-g1") for n in left), left
    client, run = mlflow_run(stack.env, name)
    assert run.info.status == "FINISHED"
    _step_history(client, run.info.run_id, 2560)
    print(f"FIGURE pickle + flipped byte: fell back 2 checkpoints, images redone {reached - images_of(names[0])}")


def test_strict_mode_bad_shard_fails_at_once_and_marks_the_run_failed(stack, digits_shards):
    env = stack.env
    s3 = _s3(env)
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
    assert restored_images(logs) is None and "[FailurePolicy] RETRY" not in logs
    client, run = mlflow_run(stack.env, name)
    assert run.info.status == "FAILED" and "ShardError" in run.data.tags["ddpm.failure_reason"]
    assert _checkpoint_names(stack.env, name) == []
    print(f"FIGURE strict shard error: failed in {time.monotonic() - t0:.0f} s, no retries")


def test_concurrent_jobs_train_apart_and_a_second_job_on_a_run_in_training_is_refused(stack, digits_shards):
    """Two jobs at once on two runs (one worker each, so both fit on the 2 CPUs) train as if alone: the
    same settings give the same losses, and each run holds its own checkpoints and MLflow history. A third
    job sent to resume the first while it trains is refused before it touches anything, naming the job
    that holds the run (pipeline/train/lease.py); the first trains on undisturbed. The first run is long
    so that it is surely still training when the third job asks; it is stopped once past the second's end."""
    a, b = (f"fault-conc{i}-{uuid.uuid4().hex[:6]}" for i in (1, 2))
    total = 1920

    def args(name: str, images: int) -> list[str]:
        return ARGS + ["--train.run-name", name, "--train.total-images", str(images), "--cluster.num-workers", "1"]

    jobs = _jobs(stack.env)
    entry = {n: f"python {shlex.quote(str(TRAIN))} {shlex.join(args(n, i))}" for n, i in ((a, 64000), (b, total))}
    ids = {n: jobs.submit_job(entrypoint=e) for n, e in entry.items()}
    deadline = time.monotonic() + 600

    def wait(until, what: str) -> None:
        while not until():
            assert time.monotonic() < deadline, f"{what}:\n{jobs.get_job_logs(ids[a])[-3000:]}"
            assert not jobs.get_job_status(ids[a]).is_terminal(), jobs.get_job_logs(ids[a])[-3000:]
            time.sleep(1)

    try:
        wait(lambda: _checkpoint_names(stack.env, a), "no checkpoint of the first run")
        t0 = time.monotonic()
        status, logs = submit(stack.env, args(a, 64000) + ["--train.resume"], timeout=180)
        refused_s = time.monotonic() - t0
        assert status == "FAILED", logs[-3000:]
        assert f"error: run '{a}' is being trained by Ray job {ids[a]} (pid " in logs, logs[-3000:]
        assert "waiting for" not in logs  # refused before any worker was asked for
        wait(lambda: jobs.get_job_status(ids[b]).is_terminal(), "the second run did not end")
        assert str(jobs.get_job_status(ids[b])) == "SUCCEEDED", jobs.get_job_logs(ids[b])[-4000:]
        wait(lambda: furthest_progress(jobs.get_job_logs(ids[a])) >= total + EVERY, "the first run stalled")
    finally:
        for job_id in ids.values():
            if not jobs.get_job_status(job_id).is_terminal():
                jobs.stop_job(job_id)
    while not jobs.get_job_status(ids[a]).is_terminal():
        time.sleep(1)
    losses = {}
    for name, state in ((a, "KILLED"), (b, "FINISHED")):  # the first was stopped: KILLED, as a stop ends it
        client, run = mlflow_run(stack.env, name)  # one MLflow run per name
        until = time.monotonic() + 30
        while run.info.status == "RUNNING" and time.monotonic() < until:
            time.sleep(1)
            run = client.get_run(run.info.run_id)
        assert run.info.status == state, (name, run.info.status)
        _step_history(client, run.info.run_id, total)
        losses[name] = dict(history(client, run.info.run_id, "train/loss"))
        left = _checkpoint_names(stack.env, name)
        assert len(left) == 2 and images_of(left[-1]) >= total, left
    shared = sorted(set(losses[a]) & set(losses[b]))
    assert len(shared) >= len(losses[b]) - 1 and shared[-1] >= total - BATCH, (shared, sorted(losses[b]))
    assert [losses[a][s] for s in shared] == pytest.approx([losses[b][s] for s in shared], rel=1e-6)
    print(
        f"FIGURE concurrent jobs: two runs equal to each other; a resume of a run in training refused in {refused_s:.0f} s"
    )


def test_a_run_lease_dies_with_its_driver(stack, stack_env):
    """A driver that holds a run and is SIGKILLed leaves no lease behind: the name is free again within
    seconds, without anyone cleaning up."""
    hold = (
        "import os, sys, time\n"
        "from pipeline.cluster import connect\n"
        "from pipeline.train import lease\n"
        "connect(os.environ['RAY_ADDRESS'], log=lambda _: None)\n"
        "lease.acquire(sys.argv[1])\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    name = f"lease-{uuid.uuid4().hex[:6]}"
    holder = subprocess.Popen([sys.executable, "-c", hold, name], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        probe = (
            "import os, sys\n"
            "from pipeline.cluster import connect\n"
            "from pipeline.train import lease\n"
            "connect(os.environ['RAY_ADDRESS'], log=lambda _: None)\n"
            "try:\n"
            "    lease.acquire(sys.argv[1])\n"
            "except lease.RunBusyError as e:\n"
            "    print(e)\n"
            "else:\n"
            "    print('acquired')\n"
        )

        def try_acquire() -> str:
            r = subprocess.run(
                [sys.executable, "-c", probe, name], cwd=REPO, capture_output=True, text=True, timeout=120
            )
            assert r.returncode == 0, r.stderr[-3000:]
            return r.stdout.strip().splitlines()[-1]

        assert "is being trained by Ray job " in (busy := try_acquire()) and f" (pid {holder.pid} on " in busy, busy
        holder.kill()
        holder.wait(timeout=30)
        t0 = time.monotonic()
        while (answer := try_acquire()) != "acquired":
            assert time.monotonic() - t0 < 60, answer
            time.sleep(1)
        print(f"FIGURE run lease free again {time.monotonic() - t0:.0f} s after its driver was SIGKILLed")
    finally:
        holder.kill()
        holder.wait()
