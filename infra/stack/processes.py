"""Processes and ports through /proc (Linux only): launching a service in its own session, finding
what belongs to it later, stopping exactly that by PID, and naming who holds a port.

A service's processes are the members of the session it was started in, plus their descendants
(Ray job drivers start sessions of their own). A record of the session leader's PID, its start time
and the boot id survives the launching process; the start time guards against a reused PID.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from infra.stack.config import HOST, StackError

ProcessTable = dict[int, tuple[int, int, int]]  # pid -> (ppid, session id, start time in clock ticks)

_CHILDREN: dict[int, subprocess.Popen] = {}  # Popen objects of the services this process started (reaped later)


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, session id, start time in clock ticks) of a live, non-zombie process."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[1]), int(fields[3]), int(fields[19])


def boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


def process_table() -> ProcessTable:
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            table[int(name)] = st
    return table


def session_tree(record: Mapping, table: ProcessTable) -> set[int]:
    """Live processes of a launched service: members of its session started no earlier than the
    recorded leader, plus all their descendants."""
    sid, since = record["pid"], record["start_ticks"]
    found = {pid for pid, (_, s, start) in table.items() if s == sid and start >= since}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    found.discard(os.getpid())
    return found


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB; PSS splits shared pages between the processes sharing them."""
    vals = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, _, rest = line.partition(":")
            vals[key] = int(rest.split()[0])
    return vals.get("Rss", 0), vals.get("Pss", 0)


# ---------------------------------------------------------------- ports


def port_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_owner(port: int) -> str:
    """' by pid N (name)' of the process listening on port, or '' when it cannot be told."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(int(cols[9]))
    for pid in process_table() if inodes else ():
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and int(link[8:-1]) in inodes:
                    name = Path(f"/proc/{pid}/comm").read_text().strip()
                    return f" by pid {pid} ({name})"
    return ""


# ---------------------------------------------------------------- launching and stopping


def launch(argv: list[str], env: Mapping[str, str], cwd: Path, log: Path) -> dict:
    """Start argv in a new session, output appended to log; the record that finds and stops it later."""
    with open(log, "ab") as f:
        f.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n".encode())
        f.flush()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=dict(env), cwd=cwd,
            start_new_session=True,
        )  # fmt: skip
    _CHILDREN[proc.pid] = proc
    st = _stat(proc.pid)
    # The session id is proc.pid; `start_ticks` guards against a later reuse of that id.
    return {
        "pid": proc.pid,
        "start_ticks": st[2] if st else 0,
        "boot_id": boot_id(),
        "argv": argv,
        "started_at": time.time(),
    }


def exit_code(record: Mapping) -> int | None:
    """Exit status of a service this process launched, None while it runs (or if launched elsewhere)."""
    proc = _CHILDREN.get(record["pid"])
    return None if proc is None else proc.poll()


def stop(record: Mapping, grace: float) -> None:
    """SIGTERM the service's processes, SIGKILL what is left after `grace` seconds; returns when all are gone."""
    deadline, sig = time.monotonic() + grace, signal.SIGTERM
    tracked: dict[int, int] = {}  # pid -> start ticks of every process seen: orphans stay targets
    signalled: set[int] = set()
    while True:
        for pid, child in list(_CHILDREN.items()):  # reap our exited children (no zombies)
            if child.poll() is not None:
                _CHILDREN.pop(pid, None)
        table = process_table()
        pids = session_tree(record, table)
        pids |= {pid for pid, start in tracked.items() if pid in table and table[pid][2] == start}
        if not pids:
            return
        tracked.update({pid: table[pid][2] for pid in pids if pid in table})
        if sig == signal.SIGTERM and time.monotonic() > deadline:
            sig, signalled, deadline = signal.SIGKILL, set(), time.monotonic() + 10
        elif sig == signal.SIGKILL and time.monotonic() > deadline:
            raise StackError(f"processes {sorted(pids)} survived SIGKILL")
        for pid in pids - signalled:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        signalled |= pids
        time.sleep(0.2)
