"""Scratch directories (pipeline/scratch.py): a process killed outright leaves its own behind, and the
next one made on the host removes it; a live process's, another kind's and another PID namespace's stay."""

import os
import signal
import subprocess
import sys

from pipeline.scratch import _pid_namespace, scratch_dir

MAKE = "import sys, time\nfrom pipeline.scratch import scratch_dir\nprint(scratch_dir('ckpt', sys.argv[1]), flush=True)\ntime.sleep(600)\n"


def test_a_killed_processs_directory_is_removed_by_the_next_one(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", MAKE, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        left = tmp_path / os.path.basename(child.stdout.readline().strip())
        (left / "checkpoint.pt").write_bytes(b"x" * 1024)
        assert left.name.startswith(f"ddpm-ckpt-{_pid_namespace()}.{child.pid}-")
        mine = scratch_dir("ckpt", tmp_path)  # the child still runs: its directory stays
        assert left.is_dir() and mine.is_dir()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    other_ns = tmp_path / f"ddpm-ckpt-1.{child.pid}-abc"  # a process of another PID namespace
    other_kind = tmp_path / f"ddpm-tracker-{_pid_namespace()}.{child.pid}-abc"
    for d in (other_ns, other_kind):
        d.mkdir()
    scratch_dir("ckpt", tmp_path)
    assert not left.exists() and mine.is_dir() and other_ns.is_dir() and other_kind.is_dir()
