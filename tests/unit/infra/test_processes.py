"""Launching, finding and stopping a service's processes by PID, and naming a port's owner: with
plain shell processes standing in for the services."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from infra.stack import Stack, StackConfig, StackError, processes


def _launch(tmp_path, script: str) -> dict:
    return processes.launch(["sh", "-c", script], dict(os.environ), tmp_path, tmp_path / "service.log")


def _wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def test_a_service_is_its_session_and_descendants_and_stop_ends_them_all(tmp_path):
    # A child in a session of its own (as a Ray job driver starts) still belongs to the service.
    record = _launch(tmp_path, "sleep 60 & setsid sleep 61 & echo started; wait")
    try:
        tree = _wait_for(lambda: len(pids := processes.session_tree(record, processes.process_table())) >= 3 and pids)
        assert record["pid"] in tree and len(tree) == 3, tree
        assert processes.exit_code(record) is None
        assert "started" in _wait_for(lambda: (tmp_path / "service.log").read_text())
    finally:
        processes.stop(record, grace=5)
    assert processes.session_tree(record, processes.process_table()) == set()
    assert all(processes._stat(pid) is None for pid in tree)


def test_stop_kills_what_ignores_sigterm_after_the_grace_period(tmp_path):
    record = _launch(tmp_path, "trap '' TERM; sleep 60 & wait")
    _wait_for(lambda: len(processes.session_tree(record, processes.process_table())) >= 2)
    t0 = time.monotonic()
    processes.stop(record, grace=0.5)
    assert processes.session_tree(record, processes.process_table()) == set()
    assert 0.5 <= time.monotonic() - t0 < 10


def test_a_reused_pid_is_not_the_service(tmp_path):
    record = _launch(tmp_path, "sleep 60")
    try:
        later = {**record, "start_ticks": record["start_ticks"] + 10**9}  # a session started after ours
        assert processes.session_tree(later, processes.process_table()) == set()
    finally:
        processes.stop(record, grace=5)


def test_a_port_taken_by_another_process_is_named(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        assert not processes.port_free(port)
        comm = Path("/proc/self/comm").read_text().strip()
        assert processes.port_owner(port) == f" by pid {os.getpid()} ({comm})"
        config = StackConfig.resolve(state_dir=tmp_path / "state", port_offset=300, environ={}, s3_port=port)
        with pytest.raises(
            StackError, match=rf"port {port} \(S3\) on 127.0.0.1 is already in use by pid {os.getpid()}"
        ):
            Stack(config).up(services=["s3"], timeout=10)
    assert Stack(config).pids() == {}
    assert processes.port_free(port)
