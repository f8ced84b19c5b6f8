"""What a training worker on another host needs and checks before training: the services it must
reach, the MLflow login handed over by the driver, and which host each rank runs on (recorded in the
run's provenance).

Environment variables set on the head never reach the processes of other nodes. What the workers
need travels with the job: non-secret variables (the network interface for gloo/NCCL) in the worker
runtime_env, which the Ray dashboard shows; secrets (S3 secret key, MLflow password) inside the
train_loop_config, which stays in the cluster's object store and is never printed or logged.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Mapping
from urllib.parse import urlparse

from pipeline.config import MLFLOW_LOGIN, Settings
from pipeline.data.storage import retry_with_backoff

_RANK_HOSTS: list[dict] | None = None


class UnreachableError(RuntimeError):
    """A worker host cannot open a connection to a service the run needs."""


def worker_env_vars(settings: Settings) -> dict[str, str]:
    """Non-secret variables every training worker needs, for the job's worker runtime_env."""
    ifname = settings.cluster.socket_ifname
    # gloo (and NCCL's bootstrap) otherwise use the address the hostname resolves to, often 127.0.0.1.
    return {"GLOO_SOCKET_IFNAME": ifname, "NCCL_SOCKET_IFNAME": ifname} if ifname else {}


def driver_login(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The driver's MLflow login, to hand to the workers inside the train_loop_config."""
    env = os.environ if environ is None else environ
    return {k: env[k] for k in MLFLOW_LOGIN if env.get(k)}


def node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray: the address the hostname resolves to
        return socket.gethostbyname(socket.gethostname())


def endpoints(settings: Settings, tracked: bool) -> dict[str, str]:
    """name -> URL of the services this worker talks to directly."""
    out = {}
    if settings.storage.endpoint_url:
        out["S3"] = settings.storage.endpoint_url
    if tracked and settings.tracking.uri and settings.tracking.uri.startswith(("http://", "https://")):
        out["MLflow"] = settings.tracking.uri
    return out


def check_reachable(services: Mapping[str, str], timeout: float = 5.0, wait_s: float = 0.0) -> None:
    """Open a TCP connection to each service; the error names this host, the endpoint and how long it
    waited. A service that does not answer is retried with backoff (as ``ride_out`` retries storage
    operations) for up to ``wait_s`` seconds in all: a worker given ``storage.outage_s`` waits out an
    outage while its group (re)starts as a running worker would, instead of failing the start and
    spending one of ``cluster.max_failures``."""
    start, where = time.monotonic(), f"worker host {socket.gethostname()} ({node_ip()})"
    for name, url in services.items():
        u = urlparse(url)
        port = u.port or (443 if u.scheme == "https" else 80)

        def waiting(e: Exception, waited: float, name: str = name, url: str = url) -> None:
            print(
                f"[hosts] {where} waiting for {name} at {url} ({e}); {time.monotonic() - start:.0f} s so far, "
                f"retrying for up to {wait_s:g} s",
                file=sys.stderr,
                flush=True,
            )

        def give_up(e: Exception, waited: float, name: str = name, url: str = url) -> Exception:
            spent = time.monotonic() - start
            waited_text = f" (waited {spent:.0f} s, storage.outage_s={wait_s:g})" if wait_s else ""
            return UnreachableError(
                f"{where} cannot reach {name} at {url}: {e}{waited_text}; the endpoint must be an address "
                "every node of the cluster can reach (not 127.0.0.1 on another host)"
            )

        retry_with_backoff(
            lambda h=u.hostname, p=port: socket.create_connection((h, p), timeout=timeout).close(),
            transient=lambda e: isinstance(e, OSError),
            limit=max(start + wait_s - time.monotonic(), 0.0),  # one budget for all the services
            waiting=waiting,
            give_up=give_up,
        )


def gather_rank_hosts() -> list[dict]:
    """Every rank's host and node IP, in rank order (a collective: every rank calls it); kept for provenance."""
    global _RANK_HOSTS
    import torch.distributed as torch_dist

    me = {"hostname": socket.gethostname(), "node_ip": node_ip(), "pid": os.getpid()}
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        _RANK_HOSTS = [me | {"rank": 0}]
        return _RANK_HOSTS
    out: list = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, me)
    _RANK_HOSTS = [h | {"rank": r} for r, h in enumerate(out)]
    return _RANK_HOSTS


def rank_hosts() -> list[dict] | None:
    """What ``gather_rank_hosts`` found in this process, None if it was not called."""
    return _RANK_HOSTS
