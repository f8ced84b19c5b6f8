"""Connecting a job's driver to Ray: inside ``ray job submit``, from a shell, or a new local Ray.

``connect`` turns the addresses this project uses into a ``ray.init`` call, including the Jobs API
URL ``http://host:8265`` that ``RAY_ADDRESS`` often holds (``ray job submit`` wants it).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.config import ConfigError, env_file

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
RAY_AUTH = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")


class AddressError(ValueError):
    """A Ray address that ``ray.init`` cannot use and that could not be translated."""


class DeviceError(ConfigError):
    """The settings ask for a device the cluster cannot give."""


# ------------------------------------------------------------------------------------------------
# Devices


def choose_device(
    mode: str, gpus: float, workers: int, *, fewer_ok: bool = False, suggest: int | None = None
) -> tuple[bool, int]:
    """(GPU workers?, how many) for ``workers`` workers of one GPU each on a cluster with ``gpus``
    GPUs, by ``cluster.use_gpu`` ``mode``: the one rule of training and sampling.

    ``no``: CPU workers. ``auto``: GPUs when the cluster has any. ``yes``: GPUs, refused without.
    With fewer GPUs than workers, ``fewer_ok`` (sampling: actors share the seeds) runs one worker per
    GPU; otherwise (training: the group's size is the settings') it is refused with the way out
    (``suggest``: the worker count to propose), since Ray would wait for the missing GPUs for ever.
    """
    if mode == "no" or (mode == "auto" and gpus < 1):
        return False, workers
    if gpus >= workers or (fewer_ok and gpus >= 1):
        return True, min(workers, int(gpus))
    if mode == "yes":
        raise DeviceError(
            f"cluster.use_gpu=yes asks for {workers} GPU worker(s) but the cluster has {gpus:g} GPU(s); "
            "use --cluster.use-gpu auto or no, or fewer --cluster.num-workers"
        )
    raise DeviceError(
        f"cluster.use_gpu=auto: the cluster has {gpus:g} GPU(s) for {workers} workers of one GPU each; "
        f"pass --cluster.num-workers {suggest or int(gpus)} to train on the GPU(s), or --cluster.use-gpu no for "
        "CPU workers"
    )


# ------------------------------------------------------------------------------------------------
# Connecting


def refresh_ray_auth() -> None:
    """Make an already-imported Ray re-read RAY_AUTH_MODE / RAY_AUTH_TOKEN from os.environ.

    Ray caches its auth mode and token on first use; call this after changing those variables in
    a process that uses Ray only as a client. Private Ray API, the same calls Ray makes when it
    turns token auth on for itself; a no-op if they are gone."""
    if "ray" not in sys.modules:
        return
    with contextlib.suppress(ImportError, AttributeError):
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def in_ray_job() -> bool:
    """True inside a driver started by ``ray job submit`` (Ray sets RAY_ADDRESS to the GCS itself)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def _local_ray_args(exe_suffix: str) -> list[dict[str, str]]:
    """``--key=value`` options of the local processes whose argv has an entry ending in ``exe_suffix``."""
    proc = Path("/proc")
    out: list[dict[str, str]] = []
    if not proc.is_dir():
        return out
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (d / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if any(a.endswith(exe_suffix) for a in argv[:3]):
            out.append(dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a))
    return out


def _local_dashboard_gcs_address(port: int) -> str | None:
    """GCS address of a Ray running on this machine whose dashboard listens on ``port`` (Linux /proc)."""
    for opts in _local_ray_args("dashboard/dashboard.py"):
        if opts.get("port") == str(port) and opts.get("gcs-address"):
            return opts["gcs-address"]
    return None


def _local_gcs_node_ip(port: int) -> str | None:
    """--node-ip-address of the GCS server listening on ``port`` on this machine, if there is one."""
    for opts in _local_ray_args("gcs_server"):
        if opts.get("gcs_server_port") == str(port):
            return opts.get("node-ip-address")
    return None


def _use_loopback() -> None:
    """Make this driver's Ray use 127.0.0.1 as its node address.

    Ray replaces a loopback GCS address with the machine's address before connecting
    (``resolve_ip_for_localhost``), which fails for a head started with --node-ip-address=127.0.0.1
    (the local stack's). ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which the stack gives its own Ray
    processes, turns that off; Ray reads it at import, so the constant is set as well.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def resolve_address(address: str | None) -> str:
    """What to give ``ray.init`` for ``cluster.address``.

    None: a new local Ray ("local"; never some other cluster found on the machine). "auto",
    host:port (GCS) and ray://host:port (Ray Client) pass through. http(s)://host:port is the
    dashboard / Jobs API URL, which ``ray.init`` does not take: on this machine it is translated to
    the GCS address of the Ray whose dashboard process listens there; elsewhere the error says what
    to use instead.
    """
    if not address or address == "local":
        return "local"
    if not address.startswith(("http://", "https://")):
        return address
    u = urlparse(address)
    host, port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
    if host in LOOPBACK:
        gcs = _local_dashboard_gcs_address(port)
        if gcs:
            return gcs
    raise AddressError(
        f"cluster.address={address!r} is a Ray dashboard / Jobs API URL, which ray.init cannot connect to, "
        "and it is not a Ray running on this machine. Give the cluster's GCS address (host:6379) or a Ray "
        f"Client address (ray://host:10001), or submit the job: ray job submit --address {address} "
        "--working-dir . -- python jobs/sample.py ..."
    )


def connect(address: str | None, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``ray.init`` for ``cluster.address`` (see ``resolve_address``); returns what was connected to.

    Outside a Ray job, a driver that joins an existing cluster ships this package to the workers
    (``runtime_env.py_modules``), so the cluster needs torch but not this repository.
    """
    auth_before = {k: os.environ.get(k) for k in RAY_AUTH}
    if not in_ray_job():
        # A token in the $DDPM_ENV_FILE file serves as if exported, as the address from it does.
        for k, v in env_file().items():
            if k in RAY_AUTH and v and not os.environ.get(k):
                os.environ[k] = v
    target = "auto" if in_ray_job() else resolve_address(address)
    import ray

    if ray.is_initialized():
        return {"address": "already connected", "started_local": False}
    if auth_before != {k: os.environ.get(k) for k in RAY_AUTH}:
        refresh_ray_auth()  # Ray caches its auth settings when first imported
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
    host, _, port = target.rpartition(":")
    if host in LOOPBACK and port.isdigit() and _local_gcs_node_ip(int(port)) in LOOPBACK:
        _use_loopback()
    if target == "local":
        kwargs["include_dashboard"] = False
    elif not in_ray_job():
        import pipeline

        kwargs["runtime_env"] = {"py_modules": [pipeline]}
    ray.init(address=target, **kwargs)
    res = ray.cluster_resources()
    log(
        f"ray: connected to {'a new local Ray' if target == 'local' else target} "
        f"({res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs)"
    )
    return {"address": target, "started_local": target == "local", "resources": res}
