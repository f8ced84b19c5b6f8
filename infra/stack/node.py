"""A worker node on another host joining a stack's Ray head (`python -m infra.stack join`).

The head must listen beyond loopback (`up --host ADDR`); Ray's token auth is on, so the node needs
the head's token: from $RAY_AUTH_TOKEN or a file (the head's `<state>/ray-auth-token`, copied over a
private channel). Environment variables set on the head never reach processes on this node: a job
passes what its workers need (endpoints, keys, the network interface for gloo/NCCL) itself.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from infra.stack.config import StackError, check_bind_address, read_private


@dataclass(frozen=True)
class JoinConfig:
    head: str  # the head's GCS address, host:port
    node_ip: str  # this node's address, the one the head and the other nodes reach it at
    num_cpus: int | None = None
    num_gpus: int | None = None
    temp_dir: Path | None = None  # Ray's session files; default under $TMPDIR

    def __post_init__(self) -> None:
        host, _, port = self.head.rpartition(":")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise StackError(f"--head must be the head's GCS address IP:PORT, not {self.head!r}") from None
        if not port.isdigit():
            raise StackError(f"--head must be the head's GCS address IP:PORT, not {self.head!r}")


def read_token(token_file: str | Path | None, environ: Mapping[str, str]) -> str:
    if environ.get("RAY_AUTH_TOKEN"):
        return environ["RAY_AUTH_TOKEN"]
    if not token_file:
        raise StackError(
            "the head's Ray token is needed to join: set RAY_AUTH_TOKEN or pass --token-file "
            "(the head's <state dir>/ray-auth-token)"
        )
    path = Path(token_file)
    if not path.is_file():
        raise StackError(f"--token-file {path} does not exist")
    return read_private(path).strip()


def join_command(cfg: JoinConfig, token: str, environ: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """argv and environment of `ray start --block` joining the head."""
    argv = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--block", f"--address={cfg.head}",
        f"--node-ip-address={cfg.node_ip}", "--disable-usage-stats", "--log-style=record", "--log-color=false",
    ]  # fmt: skip
    if cfg.num_cpus is not None:
        argv.append(f"--num-cpus={cfg.num_cpus}")
    if cfg.num_gpus is not None:
        argv.append(f"--num-gpus={cfg.num_gpus}")
    if cfg.temp_dir is not None:
        argv.append(f"--temp-dir={cfg.temp_dir}")
    env = {k: v for k, v in environ.items() if not k.startswith(("RAY_AUTH_", "RAY_ADDRESS"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # The token goes by environment: `ray get-auth-token --generate` would write ~/.ray/auth_token,
    # which silently turns token auth on for every later cluster on the machine.
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    return argv, env


def join(cfg: JoinConfig, token: str, environ: Mapping[str, str] | None = None) -> None:
    """Replace this process with the node's `ray start --block` (it runs until the node is stopped)."""
    check_bind_address(cfg.node_ip)
    argv, env = join_command(cfg, token, os.environ if environ is None else environ)
    sys.stdout.flush()
    os.execve(argv[0], argv, env)
