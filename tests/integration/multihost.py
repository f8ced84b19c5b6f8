"""A real two-host Ray cluster on one machine, for tests (needs root: network, PID and mount namespaces).

    head  (root network namespace)   the stack of infra/stack bound to HEAD_IP: S3, MLflow (basic auth),
                                     a Ray head with 1 CPU
    node  (network namespace NETNS)  `python -m infra.stack join` as init of its own PID namespace, 1 CPU,
                                     a private /tmp, /dev/shm and repository directory (only .venv and
                                     infra/ bound back), so it shares no files with the head

The two are joined by a veth pair whose both ends are named IFNAME (like a NIC on each host), on a
private /24. Everything is stopped by PID and by namespace/interface name, never by `ray stop`.
``kill_node`` SIGKILLs the node's PID-namespace init (the kernel then ends every process in it: a
faithful "host lost"); ``start_node`` brings a fresh node back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from infra.stack import Stack, StackConfig

REPO = Path(__file__).resolve().parents[2]
NETNS = "ddpm-node1"
IFNAME = "ddpm0"
HEAD_IP, NODE_IP = "10.213.7.1", "10.213.7.2"
PORT_OFFSET = 200  # beside the session test stack (+100) and a developer's stack (+0)


class NamespaceUnavailable(RuntimeError):
    """This machine or user cannot make the namespaces (not root, no iproute2/unshare)."""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=check)


def can_make_namespaces() -> str | None:
    """None if namespaces can be made here, else the reason."""
    if os.geteuid() != 0:
        return "needs root (network, PID and mount namespaces)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2 / util-linux)"
    probe = f"ddpm-probe-{os.getpid()}"
    r = _run("ip", "netns", "add", probe, check=False)
    _run("ip", "netns", "delete", probe, check=False)
    return None if r.returncode == 0 else f"`ip netns add` failed: {r.stderr.strip()}"


_NODE_SCRIPT = """
set -e
mount -t tmpfs tmpfs /dev/shm
# Hold the checkout before /tmp is covered: it may itself live under /tmp.
mkdir /dev/shm/.repo && mount --bind "$REPO" /dev/shm/.repo
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p "$REPO" && mount -t tmpfs tmpfs "$REPO"
for d in .venv infra; do mkdir -p "$REPO/$d" && mount --bind "/dev/shm/.repo/$d" "$REPO/$d"; done
umount -l /dev/shm/.repo && rmdir /dev/shm/.repo
mkdir -p /tmp/home
cd /tmp
exec "$REPO/.venv/bin/python" -m infra.stack join --head "$HEAD" --node-ip "$NODE_IP" --num-cpus 1 --temp-dir /tmp/ray
"""


class TwoHosts:
    def __init__(self, state_dir: Path | None = None):
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="ddpm-2h-"))
        base = StackConfig.resolve(state_dir=self.state_dir, port_offset=PORT_OFFSET, host=HEAD_IP, environ={})
        self.stack = Stack(dataclasses.replace(base, num_cpus=1))
        self.env: dict[str, str] = {}
        self.node: subprocess.Popen | None = None
        self.node_log = self.state_dir / "node.log"
        self.timings: dict[str, float] = {}
        self.dead_node_ids: set[str] = set()  # nodes killed here, which the head may still list as alive

    @property
    def gcs(self) -> str:
        return f"{HEAD_IP}:{self.stack.config.ray_port}"

    # ---- network

    def make_network(self) -> None:
        self.delete_network()  # a namespace left by a killed test session
        _run("ip", "netns", "add", NETNS)
        _run("ip", "link", "add", "ddpmh0", "type", "veth", "peer", "name", "ddpmn0")
        _run("ip", "link", "set", "ddpmn0", "netns", NETNS)
        _run("ip", "link", "set", "ddpmh0", "name", IFNAME)
        _run("ip", "-n", NETNS, "link", "set", "ddpmn0", "name", IFNAME)
        _run("ip", "addr", "add", f"{HEAD_IP}/24", "dev", IFNAME)
        _run("ip", "-n", NETNS, "addr", "add", f"{NODE_IP}/24", "dev", IFNAME)
        _run("ip", "link", "set", IFNAME, "up")
        _run("ip", "-n", NETNS, "link", "set", IFNAME, "up")
        _run("ip", "-n", NETNS, "link", "set", "lo", "up")

    def delete_network(self) -> None:
        _run("ip", "netns", "delete", NETNS, check=False)  # takes the namespace's end of the pair with it
        for name in (IFNAME, "ddpmh0"):
            if Path(f"/sys/class/net/{name}").exists():
                _run("ip", "link", "delete", name, check=False)

    # ---- life cycle

    def start(self) -> TwoHosts:
        t0 = time.monotonic()
        self.make_network()
        self.env = self.stack.up(timeout=240).env
        self.timings["head_s"] = time.monotonic() - t0
        self.start_node()
        self.timings["cluster_s"] = time.monotonic() - t0
        return self

    def start_node(self, timeout: float = 120.0) -> float:
        """Start the second host's Ray node and wait until the head lists it alive; returns seconds."""
        t0 = time.monotonic()
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/tmp/home", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
        env |= {"REPO": str(REPO), "HEAD": self.gcs, "NODE_IP": NODE_IP, "RAY_AUTH_TOKEN": self.env["RAY_AUTH_TOKEN"]}
        argv = ["ip", "netns", "exec", NETNS, "unshare", "--pid", "--fork", "--kill-child", "--mount"]
        argv += ["--propagation", "private", "--mount-proc", "/bin/sh", "-c", _NODE_SCRIPT]
        with open(self.node_log, "ab") as log:
            self.node = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        while not self.node_alive():
            if self.node.poll() is not None:
                raise RuntimeError(f"the second host's node exited ({self.node.returncode}):\n{self.log_tail()}")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the second host's node did not join in {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.5)
        return time.monotonic() - t0

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.node_log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def nodes(self) -> list[dict]:
        """The head's view of its nodes (Ray's state API over the dashboard, with the token)."""
        url = f"{self.stack.config.urls['ray']}/api/v0/nodes?limit=100"
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=5) as r:
                return json.loads(r.read())["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            return []

    def node_alive(self) -> bool:
        return bool(self._live_node_ids())

    def _live_node_ids(self) -> set[str]:
        alive = {n["node_id"] for n in self.nodes() if n.get("node_ip") == NODE_IP and n.get("state") == "ALIVE"}
        return alive - self.dead_node_ids

    def node_init_pid(self) -> int | None:
        """PID (in this namespace) of the second host's PID-namespace init: the child of `unshare`."""
        if self.node is None or self.node.poll() is not None:
            return None
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.node.pid}/task/{self.node.pid}/children").read_text().split()
            return int(children[0]) if children else None
        return None

    def kill_node(self) -> None:
        """SIGKILL the second host's PID-namespace init: the kernel ends every process of that host."""
        self.dead_node_ids |= self._live_node_ids()
        if (pid := self.node_init_pid()) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.node is not None:
            with contextlib.suppress(ProcessLookupError):
                self.node.kill()  # `unshare` itself (--kill-child would also end the namespace)
            self.node.wait(timeout=30)
            self.node = None

    def stop(self) -> None:
        """Everything this cluster started, by PID and by name; safe to call twice or after a failed start."""
        try:
            self.kill_node()
        finally:
            try:
                self.stack.down()
            finally:
                self.delete_network()
                shutil.rmtree(self.state_dir, ignore_errors=True)
