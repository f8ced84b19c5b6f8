"""The pipeline on a real two-host Ray cluster (the ``two_hosts`` fixture): training placed one worker per
host with DDP over the veth interface, checkpoints on S3 only, MLflow (with its login) from wherever
rank 0 runs, resuming after the second host is killed; sampling fanned out over both hosts, byte-identical
to a one-host run. The same settings on the session's one-node test stack give the comparison figures
(printed; docs/cluster.md)."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from infra.stack.services import _get_unix
from tests.integration.multihost import HEAD_IP, IFNAME, NETNS, NODE_IP

REPO = Path(__file__).resolve().parents[2]
DATA_URL = "s3://ddpm-data/test-multihost-digits"

pytestmark = pytest.mark.stack

TRAIN = [
    "--model.preset", "tiny",
    "--diffusion.num-timesteps", "100",
    "--data.url", DATA_URL,
    "--data.loader-workers", "0",
    "--train.batch-size", "32",
    "--train.total-images", "1920",
    "--train.checkpoint-every-images", "640",
    "--train.sample-every-images", "0",
    "--train.grid-size", "4",
    "--train.log-every-steps", "5",
    "--train.warmup-images", "320",
    "--train.lr", "1e-3",
    "--sample.method", "ddim",
    "--sample.steps", "10",
    "--cluster.num-workers", "2",
    "--cluster.threads-per-worker", "1",
]  # fmt: skip
# The pool waits for both actors to be ready, so a few batches each are enough.
SAMPLE = ["--num-images", "64", "--batch-size", "8", "--chunk", "8", "--workers", "2", "--no-quality", "--no-progress"]
SAMPLE += ["--sample.method", "ddim", "--sample.steps", "10"]

FIGURES: dict[str, object] = {}


def _prepare(env: dict[str, str]) -> None:
    cmd = [sys.executable, str(REPO / "jobs/prepare_data.py"), "--out", DATA_URL, "--overwrite", "--no-progress"]
    subprocess.run(cmd, env={**os.environ, **env}, check=True, capture_output=True, timeout=180)


@pytest.fixture(scope="module")
def cluster(two_hosts):
    login = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    _prepare(two_hosts.env)
    FIGURES["two_host_cluster_start_s"] = round(two_hosts.timings["cluster_s"], 1)
    yield two_hosts
    print("\nmulti-host figures:", json.dumps(FIGURES, indent=1))
    for k, v in login.items():  # mlflow_client() switched the process's login to this cluster's
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def one_host(stack):
    _prepare(stack.env)
    return stack.env


def _jobs(env):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(env["RAY_ADDRESS"], headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})


def submit(env, script: str, args: list[str], *, on_poll=None, timeout: float = 400) -> tuple[str, str, float]:
    """A job as a user submits it (`ray job submit --working-dir . -- python SCRIPT ...`): (status, logs, seconds)."""
    client, t0 = _jobs(env), time.monotonic()
    job_id = client.submit_job(
        entrypoint=f"python {script} {shlex.join(args)}",
        runtime_env={"working_dir": str(REPO), "excludes": [".stack*", "*.npz", "docs/"]},
    )
    while not (status := client.get_job_status(job_id)).is_terminal():
        if time.monotonic() - t0 > timeout:
            client.stop_job(job_id)
            pytest.fail(f"{script} did not finish in {timeout:.0f} s:\n{client.get_job_logs(job_id)[-4000:]}")
        if on_poll is not None:
            on_poll(client, job_id)
        time.sleep(1.0)
    return str(status), client.get_job_logs(job_id), time.monotonic() - t0


def mlflow_client(env):
    from mlflow.tracking import MlflowClient

    os.environ.update({k: v for k, v in env.items() if k.startswith("MLFLOW_TRACKING_")})
    return MlflowClient(env["MLFLOW_TRACKING_URI"])


def run_of(env, name):
    client = mlflow_client(env)
    exp = client.get_experiment_by_name("ddpm")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`ddpm.run_name` = '{name}'")
    assert len(runs) == 1, f"expected one MLflow run for {name}, found {len(runs)}"
    return client, runs[0]


def checkpoints(env, run_name: str) -> list[str]:
    """The run's complete checkpoints on S3 (meta.json, written last, is there)."""
    from pipeline.checkpoint import META_FILE, images_of
    from pipeline.config import StorageConfig
    from pipeline.data.storage import list_urls

    storage = StorageConfig.from_env(env)
    urls = list_urls(f"s3://ddpm-checkpoints/runs/{run_name}", storage)
    return sorted({p for u in urls if u.endswith(f"/{META_FILE}") for p in u.split("/") if images_of(p) is not None})


def images_per_s(logs: str) -> float | None:
    found = re.findall(r"([\d,.]+) images/s", logs)
    return float(found[-1].replace(",", "")) if found else None


_PROBE = """
import errno, json, socket, sys, urllib.error, urllib.request
import boto3
def status(url, method="GET", data=None):
    try:
        return urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code
def connect(port):
    with socket.socket() as s:
        s.settimeout(5)
        return errno.errorcode.get(s.connect_ex((host, port)), "connected")
mlflow, s3, ray, host, ports = sys.argv[1:6]
keyed = boto3.client("s3", endpoint_url=s3, region_name="us-east-1")  # the keys from the environment
print(json.dumps({
    "mlflow_read": status(mlflow + "/api/2.0/mlflow/experiments/search?max_results=1"),
    "mlflow_write": status(mlflow + "/api/2.0/mlflow/experiments/create", "POST", b'{"name": "intruder"}'),
    "s3_read": status(s3 + "/ddpm-data?list-type=2"),
    "s3_write": status(s3 + "/ddpm-data/intruder.txt", "PUT", b"x"),
    "s3_with_keys": keyed.list_objects_v2(Bucket="ddpm-data", MaxKeys=1)["ResponseMetadata"]["HTTPStatusCode"],
    "ray_jobs": status(ray + "/api/jobs/"),
    "ports": {name: connect(port) for name, port in json.loads(ports).items()},
}))
"""


def test_other_host_without_credentials_is_refused(cluster):
    """From the second host's network, each service the head serves beyond loopback refuses a request
    that carries no credentials: MLflow (basic auth), S3 (keys), Ray's Jobs API (token); SeaweedFS's own
    master, volume, filer and admin ports (HTTP and gRPC) and its S3 gRPC port, which take no
    credentials, are not reachable at all; S3 with the keys answers."""
    env, config = cluster.env, cluster.stack.config
    weed = {f"weed {k}": port for k, port in config.weed_ports().items()}
    probe = ["ip", "netns", "exec", NETNS, sys.executable, "-c", _PROBE]
    ports = json.dumps({**weed, "S3": config.s3_port, "MLflow": config.mlflow_port})
    keys = {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    out = subprocess.run(
        [*probe, env["MLFLOW_TRACKING_URI"], env["AWS_ENDPOINT_URL"], env["RAY_ADDRESS"], HEAD_IP, ports],
        capture_output=True, text=True, timeout=60, env={"PATH": os.environ["PATH"], **keys},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    codes = json.loads(out.stdout)
    assert codes["mlflow_read"] == 401 and codes["mlflow_write"] == 401, codes
    assert codes["s3_read"] == 403 and codes["s3_write"] == 403 and codes["s3_with_keys"] == 200, codes
    assert codes["ray_jobs"] == 401, codes
    assert codes["ports"] == {**dict.fromkeys(weed, "ECONNREFUSED"), "S3": "connected", "MLflow": "connected"}, codes
    assert HEAD_IP in env["MLFLOW_TRACKING_URI"] and HEAD_IP in env["AWS_ENDPOINT_URL"], env  # beyond loopback
    # weed's ports are up in its private network only: refused on this host's loopback too, and its master
    # answers through the owner's Unix socket.
    for port in (config.weed_ports()["filer"], config.weed_ports()["master.grpc"]):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED, port
    assert cluster.stack.weed_master_socket.stat().st_mode & 0o777 == 0o600
    assert b"DataCenters" in _get_unix(cluster.stack.weed_master_socket, "/vol/status")


def test_train_across_hosts_equals_one_host(cluster, one_host):
    """One worker per host, DDP over the veth interface, checkpoints on S3 only, MLflow with its login from
    wherever rank 0 runs, no secret in the job's logs or MLflow params; the final loss equals that of the
    same run on the session's one-node stack. Losing a host mid-run:
    test_elastic_group_shrinks_on_host_loss_and_grows_back."""
    env, name = cluster.env, f"mh-{uuid.uuid4().hex[:8]}"
    args = [*TRAIN, "--train.run-name", name, "--cluster.socket-ifname", IFNAME]
    status, logs, wall = submit(env, "jobs/train.py", args)
    assert status == "SUCCEEDED", logs[-5000:]

    client, run = run_of(env, name)
    local = Path(client.download_artifacts(run.info.run_id, "provenance.json"))
    hosts = json.loads(local.read_text())["rank_hosts"]
    assert sorted(h["node_ip"] for h in hosts) == sorted([HEAD_IP, NODE_IP]), hosts  # one worker per host
    assert checkpoints(env, name), "checkpoints are on S3"
    secrets = [env["AWS_SECRET_ACCESS_KEY"], env["MLFLOW_TRACKING_PASSWORD"], env["RAY_AUTH_TOKEN"]]
    assert not [s for s in secrets if s in logs], "a secret appears in the job's logs"
    assert not [k for k, v in run.data.params.items() if any(s in v for s in secrets)], "a secret in MLflow params"
    loss_two = client.get_metric_history(run.info.run_id, "train/loss")[-1].value

    # The same run on one host (the session's one-node stack, 2 CPUs), for the figures and the loss.
    one_name = f"oh-{uuid.uuid4().hex[:8]}"
    status1, logs1, wall1 = submit(one_host, "jobs/train.py", [*TRAIN, "--train.run-name", one_name])
    assert status1 == "SUCCEEDED", logs1[-5000:]
    client1, run1 = run_of(one_host, one_name)
    loss_one = client1.get_metric_history(run1.info.run_id, "train/loss")[-1].value
    FIGURES.update(
        {
            "train_two_hosts": {"wall_s": round(wall, 1), "images_per_s": images_per_s(logs), "final_loss": loss_two},
            "train_one_host": {"wall_s": round(wall1, 1), "images_per_s": images_per_s(logs1), "final_loss": loss_one},
        }
    )
    # The data order is fixed by the seed and gloo sums the two ranks' gradients in the same order on
    # either cluster: the same run, to float32 rounding.
    assert math.isclose(loss_two, loss_one, rel_tol=1e-5), FIGURES
    FIGURES["run"] = {"name": name, "run_id": run.info.run_id}


def _samples(client, run_id: str, eval_name: str) -> np.ndarray:
    path = client.download_artifacts(run_id, f"eval/{eval_name}/samples.npz")
    return np.load(io.BytesIO(Path(path).read_bytes()))["images"]


def _metrics(client, run_id: str, eval_name: str) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, f"eval/{eval_name}/metrics.json")).read_text())


def test_sampling_fans_out_over_both_hosts_byte_identical_to_one_host(cluster, one_host):
    if "run" not in FIGURES:
        pytest.fail("needs the run of test_train_across_hosts_equals_one_host")
    run_id, env = FIGURES["run"]["run_id"], cluster.env
    status, logs, _ = submit(env, "jobs/sample.py", ["--run-id", run_id, *SAMPLE, "--name", "two-hosts"])
    assert status == "SUCCEEDED", logs[-5000:]
    client = mlflow_client(env)
    doc = _metrics(client, run_id, "two-hosts")
    worked = {a.get("node_ip") for a in doc["per_actor"] if a.get("batches")}
    assert worked == {HEAD_IP, NODE_IP}, doc["per_actor"]

    # One host: the session stack's one-node Ray samples the same run (its MLflow and S3 are the cluster's).
    driver_env = {**os.environ, **{k: v for k, v in env.items() if not k.startswith("RAY_")}}
    driver_env |= {k: one_host[k] for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    cmd = [sys.executable, "jobs/sample.py", "--run-id", run_id, *SAMPLE, "--name", "one-host"]
    out = subprocess.run(cmd, cwd=REPO, env=driver_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    one = _metrics(client, run_id, "one-host")
    assert np.array_equal(_samples(client, run_id, "two-hosts"), _samples(client, run_id, "one-host"))
    FIGURES["sampling_images_per_s"] = {
        "two_hosts": round(doc["cost"]["images_per_s"], 2),
        "one_host": round(one["cost"]["images_per_s"], 2),
    }
    FIGURES["sampling_actors_ready_s"] = {
        "two_hosts": round(doc["cost"]["startup_s"], 1),
        "one_host": round(one["cost"]["startup_s"], 1),
    }
    FIGURES["sampling_batches_per_host"] = {a["node_ip"]: a["batches"] for a in doc["per_actor"]}


def _progress_images(logs: str) -> int | None:
    found = re.findall(r"\[train\] ([\d,]+)/[\d,]+ images \(", logs)
    return int(found[-1].replace(",", "")) if found else None


def _by_group(values: list[tuple[int, float]], changes: list[tuple[int, float]]) -> list[tuple[int, list[float]]]:
    """``values`` (step, value) split at the world-size ``changes`` (step, workers): [(workers, values)]."""
    out: list[tuple[int, list[float]]] = [(int(w), []) for _, w in changes]
    for step, v in values:
        i = max((j for j, (s, _) in enumerate(changes) if s <= step), default=None)
        if i is not None:
            out[i][1].append(v)
    return out


def test_elastic_group_shrinks_on_host_loss_and_grows_back(cluster):
    """``--cluster.num-workers 1-2``: the second host is killed mid-run (SIGKILL of its PID namespace), training
    goes on with one worker from the last checkpoint, the host comes back and the group grows back to two.
    The job is longer than it needs to be and is stopped once MLflow shows the regrown group: how long
    the phases take varies with the machine's load, not how many images they need. Figures:
    docs/elastic.md, docs/cluster.md."""
    env, name = cluster.env, f"el-{uuid.uuid4().hex[:8]}"
    if not cluster.node_alive():
        cluster.start_node()
    total, every = 400_000, 1600
    args = [a for a in TRAIN if a not in ("--cluster.num-workers", "2")]
    args = [*args, "--train.total-images", str(total), "--train.checkpoint-every-images", str(every)]
    args += ["--cluster.num-workers", "1-2", "--cluster.resize-interval-s", "5", "--cluster.max-failures", "3"]
    # Ray Train's view of the cluster lags a host loss (it refreshes every 20 s), so the group first asks
    # for two workers again; a shorter start timeout than Ray's 60 s bounds that wait.
    args += ["--cluster.worker-start-timeout-s", "20"]
    args += ["--train.progress-every-s", "1", "--train.run-name", name, "--cluster.socket-ifname", IFNAME]
    t: dict[str, float] = {}
    events: list[tuple[float, str]] = []

    def sizes_logged() -> list[tuple[int, float]]:
        client, run = run_of(env, name)
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/world_size"))

    def drive(client, job_id):
        logs = client.get_job_logs(job_id)
        now = time.monotonic()
        if "kill" not in t:
            if "world_size=2" in logs and checkpoints(env, name):
                t["images_at_kill"] = _progress_images(logs) or 0
                t["kill"], t["lines"] = now, len(logs.splitlines())
                cluster.kill_node()
            return
        if "small" not in t and re.search(r"resumed at \d+ images; world_size=1", logs):
            t["small"] = now
        for line in logs.splitlines()[int(t.get("lines", 0)) :]:  # when each line showed up, for the figures
            events.append((round(now - t["kill"], 1), line[:160]))
        t["lines"] = len(logs.splitlines())
        if "small" in t and "small_step" not in t:
            tail = logs[logs.rfind("world_size=1") :]
            if _progress_images(tail) is not None:
                t["small_step"] = now
                t["node_restart_s"] = cluster.start_node()
                t["node_back"] = time.monotonic()
        if "node_back" in t and "grown" not in t and "world_size=2" in logs[logs.rfind("world_size=1") :]:
            t["grown"] = now
        if "grown" in t and "stopped" not in t:
            sizes = sizes_logged()  # the regrown group's size reaches MLflow through rank 0's queue
            if 1.0 in _sizes_in_order(sizes) and sizes[-1][1] == 2.0:
                t["stopped"] = now
                client.stop_job(job_id)

    try:
        status, logs, wall = submit(env, "jobs/train.py", args, on_poll=drive, timeout=360)
    finally:
        print(f"\nphases (monotonic s): {t}\njob log lines after the kill (seconds after it):")
        print(
            "\n".join(
                f"{s:7.1f} {line}"
                for s, line in events
                if ("[train]" in line or "orker" in line) and "images (" not in line
            )
        )
    assert {"kill", "small", "small_step", "grown", "stopped"} <= t.keys(), (t, logs[-5000:])
    assert status == "STOPPED", logs[-5000:]

    client, run = run_of(env, name)
    rid = run.info.run_id
    by_time = sorted(client.get_metric_history(rid, "train/images_seen"), key=lambda m: m.timestamp)
    seen = [(m.step, m.value) for m in by_time]
    steps = [s for s, _ in seen]
    assert steps == sorted(set(steps)), "duplicate or backwards MLflow steps"
    assert all(s == v for s, v in seen)
    sizes = sizes_logged()
    changes = [(s, w) for i, (s, w) in enumerate(sizes) if i == 0 or w != sizes[i - 1][1]]
    assert [w for _, w in changes] == [2.0, 1.0, 2.0], sizes
    tags = {k: v for k, v in client.get_run(rid).data.tags.items() if k.startswith("elastic.resize.")}
    assert sorted(v.split(" workers")[0] for v in tags.values()) == ["1 -> 2", "2 -> 1"], tags
    assert checkpoints(env, name), "checkpoints are on S3"

    # The smaller group restores the newest checkpoint: the group had shown images_at_kill when the host
    # was killed, and the checkpoints before that are at most one interval apart. The log streams behind
    # the workers, so a checkpoint can be newer than the last progress line seen at the kill; what the
    # group redid is measured on the whole log: its furthest progress before the restart less the restore.
    resumed = [int(x) for x in re.findall(r"resumed at (\d+) images; world_size=1", logs)]
    before_restart = logs[: re.search(r"resumed at \d+ images; world_size=1", logs).start()]
    redone = max(_progress_images(before_restart) or 0, resumed[0]) - resumed[0]
    rates = _by_group([(m.step, m.value) for m in client.get_metric_history(rid, "train/images_per_s")], changes)
    figures = {
        "wall_s": round(wall, 1),
        "kill_to_smaller_group_s": round(t["small"] - t["kill"], 1),
        "kill_to_first_step_on_smaller_group_s": round(t["small_step"] - t["kill"], 1),
        "images_redone_after_loss": redone,
        "checkpoint_every_images": every,
        "node_restart_s": round(t["node_restart_s"], 1),
        "node_back_to_grown_group_s": round(t["grown"] - t["node_back"], 1),
        "world_sizes": sizes,
        "images_per_s_median": [(w, round(float(np.median(v[1:] or v)), 1)) for w, v in rates if v],
        "mlflow_run_status": client.get_run(rid).info.status,
    }
    FIGURES["elastic"] = figures
    assert figures["kill_to_first_step_on_smaller_group_s"] <= 90, figures  # 40 s at a load of 5, 66 s at 15
    assert resumed[0] >= t["images_at_kill"] - every, (resumed, t["images_at_kill"], figures)
    assert redone <= every, figures
    assert figures["mlflow_run_status"] == "KILLED", figures  # the stopped job ended its run as stopped


def _sizes_in_order(sizes: list[tuple[int, float]]) -> list[float]:
    """The world sizes (step, size) in the order the run went through them."""
    return [w for i, (_, w) in enumerate(sizes) if i == 0 or w != sizes[i - 1][1]]
