"""Connecting a job's driver to Ray: inside ``ray job submit``, from a shell, or a local Ray."""

from __future__ import annotations

import json
import os

from pipeline.config import stack_env_file


def ray_init_address(address: str | None) -> str | None:
    """The address ``ray.init`` takes for ``cluster.address``.

    ``RAY_ADDRESS`` for the Jobs API is the dashboard's http:// URL, which ``ray.init`` refuses.
    Inside a submitted job Ray sets RAY_ADDRESS to the cluster's own address, so an http URL means
    a driver started from a shell: connect to the local stack's head (its GCS port is in
    stack.json), with the stack's Ray token. No address at all starts a local Ray.
    """
    if not address or not address.startswith(("http://", "https://")):
        return address
    env_file = stack_env_file()
    stack_file = env_file.with_name("stack.json")
    if not stack_file.is_file():
        raise RuntimeError(
            f"RAY_ADDRESS={address} is a dashboard URL: submit with `ray job submit --address {address} -- "
            f"python ...`, or set RAY_ADDRESS to the cluster's GCS address (host:port)"
        )
    env = json.loads(env_file.read_text())
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        if var in env:
            os.environ.setdefault(var, env[var])
    return f"127.0.0.1:{json.loads(stack_file.read_text())['ray_port']}"


def connect(address: str | None) -> None:
    address = ray_init_address(address)
    kwargs = {}
    if address and address.startswith(("127.", "localhost")):
        # A loopback-only head (infra/stack.py): without these Ray 2.60 tells the driver the
        # machine's own address for the GCS, where nothing listens.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        kwargs["_node_ip_address"] = "127.0.0.1"
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True, **kwargs)
