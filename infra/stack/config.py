"""Where the stack listens and keeps its state: ports, the state directory, its private files."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
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
HOST_ENV = "DDPM_STACK_HOST"


class StackError(RuntimeError):
    """A service could not be started, reached or stopped; the message says which and why."""


def resolve_state_dir(state_dir: str | Path | None, environ: Mapping[str, str] | None = None) -> Path:
    """The given state directory, else $DDPM_STACK_DIR, else <repo>/.stack; absolute."""
    env = os.environ if environ is None else environ
    return Path(state_dir or env.get(STATE_ENV) or DEFAULT_STATE_DIR).expanduser().resolve()


@dataclass(frozen=True)
class StackConfig:
    state_dir: Path = DEFAULT_STATE_DIR
    s3_port: int = DEFAULT_PORTS["s3_port"]
    mlflow_port: int = DEFAULT_PORTS["mlflow_port"]
    ray_dashboard_port: int = DEFAULT_PORTS["ray_dashboard_port"]
    ray_port: int = DEFAULT_PORTS["ray_port"]
    weed_port_base: int = DEFAULT_PORTS["weed_port_base"]
    num_cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    # The address the services listen on. Beyond loopback, other hosts can join the Ray head and
    # reach S3 and MLflow, which ask for credentials there as on loopback (S3 keys, the Ray token,
    # MLflow basic auth); weed's internal ports, which ask for none, are never put on it.
    host: str = HOST

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir).expanduser().resolve())
        try:
            ipaddress.IPv4Address(self.host)
        except ValueError:
            raise ValueError(f"stack host must be an IPv4 address of this machine, not {self.host!r}") from None
        named = {k: v for group in self.service_ports().values() for k, v in group.items()}
        if len(set(named.values())) != len(named):
            raise ValueError(f"stack ports overlap: {self.service_ports()}")
        if bad := {k: v for k, v in named.items() if not 1024 <= v <= 65535}:
            raise ValueError(f"stack ports must lie in 1024..65535; out of range: {bad} (all: {self.service_ports()})")

    @classmethod
    def resolve(
        cls,
        state_dir: str | Path | None = None,
        port_offset: int | None = None,
        environ: Mapping[str, str] | None = None,
        host: str | None = None,
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
        host = host or env.get(HOST_ENV) or HOST
        return cls(state_dir=resolve_state_dir(state_dir, env), host=host, **values)

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback

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

    def listen_addresses(self, what: str) -> tuple[str, ...]:
        """Where a port of ``service_ports()`` listens: weed's own ports, which take no credentials, on
        loopback only (in weed's private network where it has one: ``up`` still wants them free here, for
        a machine without); S3 on loopback and, relayed, on the stack's address; the others on that address."""
        if what.startswith("weed "):
            return (HOST,)
        return tuple(dict.fromkeys((HOST, self.host))) if what == "S3" else (self.host,)

    @property
    def urls(self) -> dict[str, str]:
        return {
            "s3": f"http://{self.host}:{self.s3_port}",
            "mlflow": f"http://{self.host}:{self.mlflow_port}",
            "ray": f"http://{self.host}:{self.ray_dashboard_port}",
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


# ---------------------------------------------------------------- private files in the state dir


def check_bind_address(host: str) -> None:
    """Refuse an address that no interface of this machine holds (nothing could listen there)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError as e:
            raise StackError(
                f"cannot bind to {host}: it is not an address of this machine ({e.strerror}); "
                "give 127.0.0.1 or the address of one of its interfaces (`ip -4 addr`)"
            ) from None


def write_private(path: Path, text: str) -> None:
    """Write atomically with mode 0600 from the first byte."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def read_private(path: Path) -> str:
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    return path.read_text()


def write_private_json(path: Path, data: object) -> None:
    write_private(path, json.dumps(data, indent=2) + "\n")


def load_env(state_dir: str | Path | None = None) -> dict[str, str]:
    """The environment a client needs for the stack in state_dir (the env.json `up` writes)."""
    state = resolve_state_dir(state_dir)
    path = state / "env.json"
    if not path.exists():
        raise StackError(f"{path} does not exist: run `python -m infra.stack up --state-dir {state}` first")
    return json.loads(read_private(path))
