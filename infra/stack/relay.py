"""`python -m infra.stack.relay [--private-network] LISTEN=TARGET [...] -- COMMAND ...`: runs COMMAND as a
child and relays every connection made to each LISTEN (``IP:PORT``, or a Unix socket path), byte for
byte, to its TARGET (``IP:PORT``), until the child exits (with its code). `--probe` says (exit 0 or 1)
whether this machine lets the current user make a private network.

The stack needs it for SeaweedFS: `weed mini` binds all its ports to one address, and only its S3 API
checks credentials; the master, volume and filer servers (HTTP and gRPC) and the S3 gateway's gRPC
port (which replaces the S3 identities) answer anyone who can connect. With `--private-network` the
listening sockets are made first, then this process moves into a network namespace of its own (a
user namespace too when not root, so no privilege is needed) and starts weed there: weed's ports
exist only inside it, and the listeners (made outside) are the only ways in: the S3 port on the
stack's addresses, and the master's HTTP port on a Unix socket in the owner's private state directory
(to see when weed's volumes are loaded). Without it (a machine that forbids unprivileged namespaces)
weed stays on 127.0.0.1 and only the S3 port is put beyond loopback.

Being a plain byte relay it changes nothing S3 checks (the signed Host header arrives as sent). Bytes
move with splice(2), socket to pipe to socket inside the kernel: a 64 MiB GET ran at 335-439 MiB/s
through it against 365-480 MiB/s straight to weed on a 2-core machine (docs/cluster.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

PIPE_CHUNK = 1 << 20
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
PR_SET_PDEATHSIG = 1


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        ipaddress.IPv4Address(host)
        if not 0 < int(port) < 65536:
            raise ValueError
    except ValueError:
        raise SystemExit(f"relay: expected IPv4:PORT, not {text!r}") from None
    return host, int(port)


@dataclass(frozen=True)
class Route:
    listen: tuple[str, int] | str  # (IP, port), or a Unix socket's path
    target: tuple[str, int]

    @classmethod
    def parse(cls, text: str) -> Route:
        listen, sep, target = text.partition("=")
        if not sep:
            raise SystemExit(f"relay: expected LISTEN=TARGET, not {text!r}")
        return cls(listen if listen.startswith("/") else parse_address(listen), parse_address(target))

    def __str__(self) -> str:
        where = self.listen if isinstance(self.listen, str) else "{}:{}".format(*self.listen)
        return f"{where} -> {self.target[0]}:{self.target[1]}"

    def bind(self) -> socket.socket:
        if isinstance(self.listen, tuple):
            return socket.create_server(self.listen, backlog=512)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.listen)  # a socket file left by a relay that was killed
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the owner alone may connect
        try:
            server.bind(self.listen)
        finally:
            os.umask(old)
        server.listen(64)
        return server


def enter_private_network() -> None:
    """Move this (single-threaded) process into a new network namespace with its loopback up. Sockets
    made before stay in the old one; children started after are born in the new one."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWNET | (CLONE_NEWUSER if uid else 0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot make a private network namespace: {os.strerror(err)}")
    if uid:
        # Same ids inside as outside: files keep their owner; the capability to bring lo up lasts until exec.
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, request)[:18])[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _stop_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def private_network_available() -> bool:
    """Whether `--private-network` can work for this user here (asked in a child: the move is one-way)."""
    try:
        probe = [sys.executable, "-m", "infra.stack.relay", "--probe"]
        return subprocess.run(probe, capture_output=True, timeout=30, cwd=_repo_root()).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """src's bytes to dst until src's end of stream, which is passed on as a half-close."""
    r, w = os.pipe()
    try:
        while n := os.splice(src.fileno(), w, PIPE_CHUNK):
            while n:
                n -= os.splice(r, dst.fileno(), n)
        dst.shutdown(socket.SHUT_WR)
    except OSError:  # a reset on either side ends both directions
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
    finally:
        os.close(r)
        os.close(w)


def _connection(client: socket.socket, target: tuple[str, int]) -> None:
    with client:
        try:
            upstream = socket.create_connection(target, timeout=10)
        except OSError:
            return  # the target is away: the client sees its connection closed
        with upstream:
            upstream.settimeout(None)
            back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
            back.start()
            _pump(client, upstream)
            back.join()


def _accept(server: socket.socket, target: tuple[str, int]) -> None:
    while True:
        try:
            client, _ = server.accept()
        except OSError:
            return  # closed
        threading.Thread(target=_connection, args=(client, target), daemon=True).start()


def _wait_for(target: tuple[str, int], child: subprocess.Popen) -> bool:
    """Whether the target accepts connections before the child exits."""
    while child.poll() is None:
        try:
            socket.create_connection(target, timeout=2).close()
            return True
        except OSError:
            time.sleep(0.2)
    return False


def serve(routes: list[Route], command: list[str], private_network: bool = False) -> int:
    servers: dict[Route, socket.socket] = {}
    if private_network:
        # The listeners are made here, before the move, so they stay reachable from outside.
        servers = {r: r.bind() for r in routes}
        enter_private_network()
    started: list[subprocess.Popen] = []

    def pass_on(sig: int, _frame) -> None:
        # `down` signals the whole session; when only this process is signalled the child hears it too.
        if started and started[0].poll() is None:
            started[0].send_signal(sig)
        elif not started:
            raise SystemExit(128 + sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, pass_on)
    # If this process is killed outright, the child is stopped too: else weed would run on, unreachable in
    # its private network and holding the data directory.
    child = subprocess.Popen(command, preexec_fn=_stop_with_parent)
    started.append(child)
    # Serve once the first target is up. Sharing weed's network, listen only then: weed refuses, at
    # its start, a port that any address holds.
    if _wait_for(routes[0].target, child):
        try:
            servers = servers or {r: r.bind() for r in routes}
        except OSError as e:
            print(f"relay: cannot listen: {e}; stopping pid {child.pid}", flush=True)
            child.terminate()
        else:
            for route, server in servers.items():
                threading.Thread(target=_accept, args=(server, route.target), daemon=True).start()
                where = " in a private network" if private_network else ""
                print(f"relay: {route} (pid {child.pid}{where})", flush=True)
    code = child.wait()
    for route in routes:
        if isinstance(route.listen, str):
            with contextlib.suppress(OSError):
                os.unlink(route.listen)
    return code if code >= 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--probe"]:
        try:
            enter_private_network()
        except OSError as e:
            print(e, file=sys.stderr)
            return 1
        return 0
    private = bool(args) and args[0] == "--private-network"
    args = args[1:] if private else args
    if "--" not in args or args.index("--") == 0 or args.index("--") == len(args) - 1:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    at = args.index("--")
    return serve([Route.parse(a) for a in args[:at]], args[at + 1 :], private)


if __name__ == "__main__":
    sys.exit(main())
