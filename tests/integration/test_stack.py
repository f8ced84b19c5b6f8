"""The local stack (infra/stack/) against the real services: SeaweedFS S3, MLflow, Ray. No mocks.

What needs no running service (ports, state files, process handling, the CLI) is in tests/unit/infra/.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import importlib
import ipaddress
import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import boto3
import botocore
import pytest
import ray  # noqa: F401  (Ray vendors psutil and puts it on sys.path)
from botocore.config import Config
from botocore.exceptions import ClientError

from infra.stack import BUCKETS, SERVICES, Stack, StackConfig, load_env
from infra.stack.services import _get_unix

psutil = importlib.import_module("psutil")

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.stack

ENV_CONTRACT = {
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "DDPM_STACK_DIR",
}
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def s3_client(env: dict[str, str], key: str | None = None, secret: str | None = None, unsigned: bool = False):
    extra = {"signature_version": botocore.UNSIGNED} if unsigned else {}
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=key or env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=secret or env["AWS_SECRET_ACCESS_KEY"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, **extra),
    )


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with NO_PROXY.open(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def stack_processes(handle: Stack) -> list:
    procs = {}
    for pids in handle.pids().values():
        for pid in pids:
            try:
                p = psutil.Process(pid)
                for q in [p, *p.children(recursive=True)]:
                    procs[q.pid] = q
            except psutil.NoSuchProcess:
                pass
    return list(procs.values())


def free_config(state_dir: Path) -> StackConfig:
    """A config on the first port offset (200, 300, ...) whose ports are all free right now."""
    for offset in range(200, 1000, 100):
        config = StackConfig.resolve(state_dir=state_dir, port_offset=offset, environ={})
        ports = [p for group in config.service_ports().values() for p in group.values()]
        with contextlib.ExitStack() as probes:
            try:
                for port in ports:
                    probe = probes.enter_context(socket.socket())
                    probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return config
    raise AssertionError("no free port offset for a private stack")


def is_gone(p) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ---------------------------------------------------------------- the session stack


def test_env_contract_and_private_files(stack):
    env, c = stack.env, stack.config
    assert set(env) == ENV_CONTRACT
    assert env["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{c.s3_port}"
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{c.mlflow_port}"
    assert env["RAY_ADDRESS"] == f"http://127.0.0.1:{c.ray_dashboard_port}"
    assert env["AWS_DEFAULT_REGION"] == "us-east-1" and env["RAY_AUTH_MODE"] == "token"
    assert env["MLFLOW_TRACKING_USERNAME"] == "admin" and len(env["MLFLOW_TRACKING_PASSWORD"]) >= 24
    assert env["DDPM_STACK_DIR"] == str(c.state_dir) and Path(env["DDPM_STACK_DIR"]).is_absolute()
    assert load_env(c.state_dir) == env
    private = ("env.json", "credentials.json", "s3-identities.json", "ray-auth-token", "pids.json", "weed-master.sock")
    for name in (*private, "mlflow/basic-auth.ini"):
        assert stat.S_IMODE((c.state_dir / name).stat().st_mode) == 0o600, name

    cli = [sys.executable, "-m", "infra.stack"]
    out = subprocess.run(
        [*cli, "env", "--state-dir", str(c.state_dir)], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout
    exported = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in out.splitlines())
    assert exported == env
    status = subprocess.run(
        [*cli, "status", "--state-dir", str(c.state_dir)], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count(" up ") == 3


def test_second_up_is_fast_and_reuses_the_same_processes(stack):
    again = Stack(stack.config)
    records_before, pids_before = again.pids_file.read_text(), again.pids()
    t0 = time.monotonic()
    result = again.up(timeout=30)
    assert time.monotonic() - t0 < 5
    assert result.started == () and result.reused == SERVICES
    assert result.env == stack.env
    assert again.pids_file.read_text() == records_before
    after = again.pids()
    for name in ("s3", "mlflow"):
        assert after[name] == pids_before[name]
    assert set(after["ray"]) & set(pids_before["ray"])  # Ray's daemons; idle workers come and go


def test_s3_refuses_anonymous_and_wrong_keys(stack):
    env = stack.env
    good = s3_client(env)
    assert set(BUCKETS) <= {b["Name"] for b in good.list_buckets()["Buckets"]}
    key = f"tests/{uuid.uuid4().hex}"
    good.put_object(Bucket="ddpm-data", Key=key, Body=b"secret bytes")
    try:
        intruders = {
            "anonymous": s3_client(env, unsigned=True),
            "wrong secret": s3_client(env, secret="not-the-secret"),
            "unknown key": s3_client(env, key="AKIANOTAKEY000000000", secret="whatever"),
        }
        for label, client in intruders.items():
            for op in (
                lambda c: c.list_buckets(),
                lambda c: c.get_object(Bucket="ddpm-data", Key=key),
                lambda c: c.put_object(Bucket="ddpm-data", Key=key + "-x", Body=b"x"),
            ):
                with pytest.raises(ClientError) as err:
                    op(client)
                assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403, label
        assert http_status(f"{env['AWS_ENDPOINT_URL']}/ddpm-data/{key}") == 403
        assert "Contents" not in good.list_objects_v2(Bucket="ddpm-data", Prefix=key + "-x")
    finally:
        good.delete_object(Bucket="ddpm-data", Key=key)


def test_mlflow_logs_metrics_and_artifacts_without_s3_keys(stack, stack_env, monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=stack_env["MLFLOW_TRACKING_URI"])
    experiment_id = client.create_experiment(f"stack-test-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id)
    run_id = run.info.run_id
    client.log_metric(run_id, "loss", 0.25, step=3)
    (tmp_path / "note.txt").write_text("logged through the tracking server")
    client.log_artifact(run_id, str(tmp_path / "note.txt"))
    client.set_terminated(run_id)

    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(3, 0.25)]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    local = client.download_artifacts(run_id, "note.txt", str(tmp_path / "download"))
    assert Path(local).read_text() == "logged through the tracking server"
    # ...and the bytes sit in the S3 bucket behind the server.
    listed = s3_client(stack.env).list_objects_v2(Bucket="ddpm-mlflow", Prefix="artifacts/")
    assert any(o["Key"].endswith(f"{run_id}/artifacts/note.txt") for o in listed.get("Contents", []))


def test_ray_dashboard_requires_the_token(stack):
    url = f"{stack.env['RAY_ADDRESS']}/api/jobs/"
    assert http_status(url) == 401
    assert http_status(url, {"Authorization": "Bearer not-the-token"}) == 403
    assert http_status(url, {"Authorization": f"Bearer {stack.env['RAY_AUTH_TOKEN']}"}) == 200


def test_ray_job_runs_with_the_project_python_and_the_stacks_variables(stack_env):
    """A job driver resolves its settings from the head's environment: nothing travels with the job."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(stack_env["RAY_ADDRESS"])
    code = (
        "import sys, ray; ray.init(); print('PREFIX=' + sys.prefix); "
        "print('SUM=%d' % ray.get(ray.remote(lambda: 41 + 1).remote())); "
        "from pipeline.config import Settings; s = Settings.from_cli([]); "
        "print('S3=' + s.storage.endpoint_url); print('MLFLOW=' + s.tracking.uri)"
    )
    job_id = client.submit_job(entrypoint=f"python -c {shlex.quote(code)}")
    deadline = time.monotonic() + 120
    while not (status := client.get_job_status(job_id)).is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs
    assert f"PREFIX={sys.prefix}\n" in logs and "SUM=42" in logs, logs  # this project's environment
    assert f"S3={stack_env['AWS_ENDPOINT_URL']}\n" in logs, logs
    assert f"MLFLOW={stack_env['MLFLOW_TRACKING_URI']}\n" in logs, logs


def test_the_dashboard_url_resolves_to_the_stacks_gcs(stack):
    from pipeline.cluster import resolve_address

    assert resolve_address(stack.env["RAY_ADDRESS"]) == f"127.0.0.1:{stack.config.ray_port}"


def test_the_env_file_alone_configures_a_client(stack, tmp_path):
    """DDPM_ENV_FILE instead of exported variables: storage, tracking and the Ray token come from the
    stack's env.json, and a driver joins the stack's Ray through its dashboard URL."""
    code = (
        "import json, boto3, ray\n"
        "from botocore.config import Config\n"
        "from pipeline.cluster import connect\n"
        "from pipeline.config import Settings\n"
        "s = Settings.from_cli([])\n"
        "s3 = boto3.client('s3', **s.storage.boto3_kwargs(), config=Config(s3={'addressing_style': 'path'}))\n"
        "buckets = sorted(b['Name'] for b in s3.list_buckets()['Buckets'])\n"
        "info = connect(s.cluster.address, log=lambda _: None)\n"
        "answer = ray.get(ray.remote(lambda: 42).remote())\n"
        "import mlflow\n"
        "names = [e.name for e in mlflow.MlflowClient(s.tracking.uri).search_experiments()]\n"
        "print(json.dumps({'buckets': buckets, 'tracking': s.tracking.uri, 'ray': info['address'], 'answer': answer,\n"
        "                  'experiments': names}))\n"
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "DDPM_ENV_FILE": str(stack.config.state_dir / "env.json")}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(BUCKETS) <= set(out["buckets"]) and out["tracking"] == stack.env["MLFLOW_TRACKING_URI"]
    assert out["ray"] == f"127.0.0.1:{stack.config.ray_port}" and out["answer"] == 42
    assert "Default" in out["experiments"]  # MLflow's login came from the file too


def test_mlflow_refuses_requests_without_its_login(stack):
    """On loopback too: any local user can reach 127.0.0.1, and MLflow serves the checkpoints."""
    uri = stack.env["MLFLOW_TRACKING_URI"].rstrip("/")
    login = (stack.env["MLFLOW_TRACKING_USERNAME"], stack.env["MLFLOW_TRACKING_PASSWORD"])
    search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    artifacts = f"{uri}/api/2.0/mlflow-artifacts/artifacts?path="

    def status(url: str, auth: tuple[str, str] | None) -> int:
        request = urllib.request.Request(url)
        if auth:
            token = base64.b64encode(":".join(auth).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert status(search, None) == 401 and status(artifacts, None) == 401
    assert status(search, (login[0], "not-the-password")) == 401
    assert status(search, login) == 200 and status(artifacts, login) == 200


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if addr.version == 6 and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def test_nothing_listens_beyond_loopback(stack):
    bound = []
    for p in stack_processes(stack.stack):
        try:
            conns = p.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr):
                bound.append((p.pid, p.name(), c.laddr.ip, c.laddr.port))
    c = stack.config
    assert {c.s3_port, c.mlflow_port, c.ray_dashboard_port, c.ray_port} <= {port for *_, port in bound}
    assert [b for b in bound if not _is_loopback(b[2])] == []


def test_weeds_own_ports_are_out_of_reach_of_local_users(private_network, stack):
    """weed's master, volume, filer and admin ports (HTTP and gRPC), which take no credentials, exist only in
    its private network: refused here on loopback. S3 (with keys) comes through the relay, and weed's
    master through a Unix socket only the stack's owner may open."""
    assert stack.stack.private_network
    for name, port in stack.config.weed_ports().items():
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED, (name, port)
    assert s3_client(stack.env).list_buckets()["ResponseMetadata"]["HTTPStatusCode"] == 200
    sock = stack.stack.weed_master_socket
    assert sock.stat().st_mode & 0o777 == 0o600 and b"DataCenters" in _get_unix(sock, "/vol/status")


# ---------------------------------------------------------------- a private stack: restart and down


def test_restart_keeps_data_and_down_leaves_no_process():
    from ray.job_submission import JobStatus, JobSubmissionClient

    state = Path(tempfile.mkdtemp(prefix="ddpm-stack-"))  # short: Ray's socket paths live below it
    handle = Stack(free_config(state))
    try:
        first = handle.up(timeout=240)
        assert first.started == SERVICES
        env, payload = first.env, os.urandom(1 << 16)
        s3_client(env).put_object(Bucket="ddpm-data", Key="persist/probe.bin", Body=payload)

        # A running job whose driver ignores SIGTERM and runs in a session of its own: `down` stops it too.
        jobs = JobSubmissionClient(env["RAY_ADDRESS"], headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
        stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
        job_id = jobs.submit_job(entrypoint=f"python -c {shlex.quote(stubborn)}")
        deadline = time.monotonic() + 90
        while jobs.get_job_status(job_id) != JobStatus.RUNNING and time.monotonic() < deadline:
            time.sleep(0.5)
        assert jobs.get_job_status(job_id) == JobStatus.RUNNING
        procs = stack_processes(handle)
        assert any("time.sleep(600)" in " ".join(p.cmdline()) for p in procs if not is_gone(p))

        assert handle.down() == list(SERVICES)
        assert [(p.pid, p.name()) for p in procs if not is_gone(p)] == []
        assert handle.pids() == {} and all(s["state"] == "down" for s in handle.status().values())

        second = handle.up(services=["s3"], timeout=60)
        assert second.started == ("s3",) and second.env == env  # same keys, same token, same ports
        body = s3_client(env).get_object(Bucket="ddpm-data", Key="persist/probe.bin")["Body"].read()
        assert body == payload
        procs = stack_processes(handle)
        handle.down()
        assert [p.pid for p in procs if not is_gone(p)] == []
    finally:
        handle.down()
        shutil.rmtree(state, ignore_errors=True)
