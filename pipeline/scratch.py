"""Scratch directories of a worker process: checkpoints on their way to storage, fetched checkpoints,
artifacts on their way to MLflow. A process that ends normally removes its own; one that is killed
outright (an OOM kill, a worker group stopped by Ray, ``ray job stop``) cannot, and a fetched
checkpoint can be gigabytes. So each new directory first removes those that processes of this PID
namespace left behind and that no longer run: the namespace and the PID are in the name."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").split("[")[1].rstrip("]")  # "pid:[4026531836]"
    except (OSError, IndexError):
        return "0"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep(kind: str, root: str | Path) -> list[Path]:
    """Remove ``ddpm-<kind>-<namespace>.<pid>-*`` directories under ``root`` whose process, in this PID
    namespace, no longer runs; returns them."""
    gone = []
    for d in Path(root).glob(f"ddpm-{kind}-{_pid_namespace()}.*-*"):
        pid = d.name.split("-")[2].partition(".")[2]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def scratch_dir(kind: str, root: str | Path | None = None) -> Path:
    """A new private directory ``ddpm-<kind>-<namespace>.<pid>-XXXX`` under ``root`` (the temp dir by
    default), after removing those of processes that are gone."""
    root = Path(root or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    sweep(kind, root)
    return Path(tempfile.mkdtemp(prefix=f"ddpm-{kind}-{_pid_namespace()}.{os.getpid()}-", dir=root))
