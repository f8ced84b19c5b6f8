"""The relay that puts the stack's S3 port, and nothing else of SeaweedFS, on a non-loopback address
(infra/stack/relay.py), with a stand-in child: real processes and sockets on loopback addresses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

# Answers each connection, once the client has half-closed it, with the bytes reversed.
ECHO = """
import socket, sys
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    conn, _ = server.accept()
    data = b""
    while chunk := conn.recv(1 << 16):
        data += chunk
    conn.sendall(data[::-1])
    conn.close()
"""


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.2", port))
            except OSError:
                continue
        return port


def _relay(port: int, child: list[str], *routes: str) -> subprocess.Popen:
    routes = routes or (f"127.0.0.2:{port}=127.0.0.1:{port}",)
    argv = [sys.executable, "-m", "infra.stack.relay", *routes, "--", *child]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)


def _exchange(connect, payload: bytes) -> bytes:
    with connect() as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := c.recv(1 << 16):
            got += chunk
    return got


def test_relay_passes_bytes_and_the_half_close_and_ends_with_its_child():
    port = _free_port()
    relay = _relay(port, [sys.executable, "-c", ECHO, str(port)])
    try:
        assert relay.stdout.readline().startswith(f"relay: 127.0.0.2:{port} -> 127.0.0.1:{port}")
        payload = os.urandom(3 << 20)
        for _ in range(2):
            assert (
                _exchange(lambda: socket.create_connection(("127.0.0.2", port), timeout=30), payload) == payload[::-1]
            )
        relay.send_signal(signal.SIGTERM)  # passed on: the child dies of it and the relay reports that
        assert relay.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        relay.kill()
        relay.wait()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.2", port)) != 0  # nothing listens any more


def test_relay_never_listens_when_its_child_fails_to_start():
    port = _free_port()
    relay = _relay(port, [sys.executable, "-c", "raise SystemExit(3)"])
    assert relay.wait(timeout=30) == 3
    assert relay.stdout.read() == ""


def _unix(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(path))
    return s


def test_private_network_hides_the_childs_ports_but_the_routes(private_network, tmp_path):
    """The child listens on 127.0.0.1:PORT inside a network of its own: from here that port is the relay's,
    and a Unix socket that only the owner may open leads to the same child; the child's second port is
    not reachable at all."""
    port, hidden, sock = _free_port(), _free_port(), tmp_path / "child.sock"
    both = ECHO.replace("server = ", "hidden = socket.create_server(('127.0.0.1', int(sys.argv[2])))\nserver = ")
    child = [sys.executable, "-c", both, str(port), str(hidden)]
    relay = _relay(port, child, "--private-network", f"127.0.0.1:{port}=127.0.0.1:{port}", f"{sock}=127.0.0.1:{port}")
    try:
        lines = {relay.stdout.readline().strip() for _ in range(2)}
        assert f"relay: 127.0.0.1:{port} -> 127.0.0.1:{port} (pid" in " ".join(lines), lines
        assert sock.stat().st_mode & 0o777 == 0o600
        payload = os.urandom(1 << 20)
        assert _exchange(lambda: socket.create_connection(("127.0.0.1", port), timeout=30), payload) == payload[::-1]
        assert _exchange(lambda: _unix(sock), payload) == payload[::-1]
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", hidden)) != 0  # the child's other port exists only inside
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        relay.kill()
        relay.wait()
    assert not sock.exists()


def test_a_killed_relay_takes_its_child_with_it():
    """SIGKILL leaves the relay no time to pass anything on: the child still stops (weed must not run on,
    unreachable in its private network, holding the data directory)."""
    port, child = _free_port(), None
    relay = _relay(port, [sys.executable, "-c", ECHO, str(port)])
    try:
        line = relay.stdout.readline()
        child = int(line.split("(pid ")[1].split(")")[0].split()[0])
        relay.kill()
        relay.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(child):
            assert time.monotonic() < deadline, f"child {child} outlived its relay"
            time.sleep(0.1)
    finally:
        relay.kill()
        relay.wait()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
