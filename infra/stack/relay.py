"""`python -m infra.stack.relay LISTEN_IP:PORT TARGET_IP:PORT -- COMMAND ...`: runs COMMAND as a child and
relays every TCP connection made to LISTEN, byte for byte, to TARGET, until the child exits (with its code).

The stack serving other hosts needs it for SeaweedFS: `weed mini` binds all its ports to one address,
and only its S3 API checks credentials; the master, volume and filer servers (HTTP and gRPC) and the
S3 gateway's gRPC port (which replaces the S3 identities) answer anyone. So weed stays on 127.0.0.1
and this process puts exactly one port, the S3 API's, on the address other hosts reach. Being a
plain byte relay it changes nothing S3 checks (the signed Host header arrives as sent). Bytes move
with splice(2), socket to pipe to socket inside the kernel: a 64 MiB GET ran at 335-439 MiB/s through
it against 365-480 MiB/s straight to weed on a 2-core machine (docs/cluster.md).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time

PIPE_CHUNK = 1 << 20


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        ipaddress.IPv4Address(host)
        if not 0 < int(port) < 65536:
            raise ValueError
    except ValueError:
        raise SystemExit(f"relay: expected IPv4:PORT, not {text!r}") from None
    return host, int(port)


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


def serve(listen: tuple[str, int], target: tuple[str, int], command: list[str]) -> int:
    child = subprocess.Popen(command)
    for sig in (signal.SIGTERM, signal.SIGINT):
        # `down` signals the whole session; when only this process is signalled the child hears it too.
        signal.signal(sig, lambda s, _frame: child.poll() is None and child.send_signal(s))
    # Listen only once the target is up: weed refuses, at its start, a port that any address holds.
    if _wait_for(target, child):
        try:
            server = socket.create_server(listen, backlog=512)
        except OSError as e:
            print(f"relay: cannot listen on {listen[0]}:{listen[1]}: {e}; stopping pid {child.pid}", flush=True)
            child.terminate()
        else:
            threading.Thread(target=_accept, args=(server, target), daemon=True).start()
            print(f"relay: {listen[0]}:{listen[1]} -> {target[0]}:{target[1]} (pid {child.pid})", flush=True)
    code = child.wait()
    return code if code >= 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 4 or args[2] != "--":
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    return serve(parse_address(args[0]), parse_address(args[1]), args[3:])


if __name__ == "__main__":
    sys.exit(main())
