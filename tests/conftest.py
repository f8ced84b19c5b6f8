"""Shared pytest fixtures. Keep each group of fixtures under its own banner."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from infra.stack import Stack, StackConfig
from pipeline.cluster import refresh_ray_auth

REPO_ROOT = Path(__file__).resolve().parents[1]

# ==================================================================================================
# Local real stack (infra/stack/, docs/stack.md): S3 + MLflow + Ray head on test ports.
#
#   @pytest.mark.stack
#   def test_x(stack, stack_env):   # stack.env / stack.config; stack_env: os.environ has the env
#       ...
#
# The session stack lives in <repo>/.stack-test on the default ports + TEST_STACK_PORT_OFFSET
# (S3 8433, MLflow 5100, Ray dashboard 8365, GCS 6479; DDPM_TEST_STACK_PORT_OFFSET picks another offset and
# the state folder <repo>/.stack-test-<offset>, for two runs at once, in one checkout or two). A stack
# already running there is reused.
# Sessions running at the same time share it: each holds a lease (<state>/test-leases/<pid>), and
# what a session started is stopped when the last session using the stack ends. Nothing is stopped
# with DDPM_KEEP_TEST_STACK=1 (the next session then reuses the stack in about a second).
# ==================================================================================================

TEST_STACK_PORT_OFFSET = int(os.environ.get("DDPM_TEST_STACK_PORT_OFFSET", "100"))
TEST_STACK_DIR = REPO_ROOT / (
    ".stack-test" if TEST_STACK_PORT_OFFSET == 100 else f".stack-test-{TEST_STACK_PORT_OFFSET}"
)


@dataclass(frozen=True)
class RunningStack:
    config: StackConfig
    env: dict[str, str]  # the env contract (docs/stack.md)
    stack: Stack
    started: tuple[str, ...]  # the services this session started


@contextlib.contextmanager
def _test_leases(state_dir: Path) -> Iterator[Path]:
    """The lease directory, locked; leases of processes that are gone are removed."""
    leases = state_dir / "test-leases"
    leases.mkdir(parents=True, exist_ok=True)
    with open(leases / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for lease in leases.glob("[0-9]*"):
            try:
                os.kill(int(lease.name), 0)
            except ProcessLookupError:
                lease.unlink(missing_ok=True)
            except PermissionError:
                pass
        yield leases


@pytest.fixture(scope="session")
def stack() -> Iterator[RunningStack]:
    config = StackConfig.resolve(state_dir=TEST_STACK_DIR, port_offset=TEST_STACK_PORT_OFFSET, environ={})
    handle = Stack(config)
    with _test_leases(config.state_dir) as leases:
        result = handle.up(timeout=240)
        (leases / str(os.getpid())).touch()
    try:
        # MLflow's client reads its login from os.environ only; the session's clients talk to this stack.
        with pytest.MonkeyPatch.context() as mp:
            for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                mp.setenv(k, result.env[k])
            yield RunningStack(config=config, env=result.env, stack=handle, started=result.started)
    finally:
        with _test_leases(config.state_dir) as leases:
            (leases / str(os.getpid())).unlink(missing_ok=True)
            to_stop = leases / "stop-when-unused.json"  # services started by sessions that have ended
            pending = set(json.loads(to_stop.read_text())) if to_stop.exists() else set()
            pending |= set(result.started)
            if any(leases.glob("[0-9]*")):
                to_stop.write_text(json.dumps(sorted(pending)))
            else:
                if os.environ.get("DDPM_KEEP_TEST_STACK") != "1":
                    handle.down(services=pending)
                to_stop.unlink(missing_ok=True)


@contextlib.contextmanager
def _stack_environ(stack: RunningStack) -> Iterator[dict[str, str]]:
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):  # would mix with the keys
            mp.delenv(key, raising=False)
        for key, value in stack.env.items():
            mp.setenv(key, value)
        refresh_ray_auth()  # Ray caches RAY_AUTH_* at first use
        yield stack.env
    refresh_ray_auth()


@pytest.fixture
def stack_env(stack: RunningStack) -> Iterator[dict[str, str]]:
    """Puts the stack's env vars into os.environ for one test (restored afterwards)."""
    with _stack_environ(stack) as env:
        yield env


@pytest.fixture(scope="module")
def module_stack_env(stack: RunningStack) -> Iterator[dict[str, str]]:
    """The same for a whole test module (for module-scoped fixtures that train or log runs)."""
    with _stack_environ(stack) as env:
        yield env


@pytest.fixture(scope="module")
def s3(request, stack: RunningStack) -> Iterator[SimpleNamespace]:
    """A fresh prefix on the stack's S3 for one test module (``root``), with its ``storage``
    settings and the stack's ``env``; everything under it is deleted after the module."""
    from pipeline.config import StorageConfig
    from pipeline.data.storage import delete_urls, list_urls

    storage = StorageConfig.from_env(stack.env)
    module = request.module.__name__.rpartition(".")[2].replace("_", "-")
    root = f"s3://ddpm-data/{module}-{uuid.uuid4().hex[:10]}"
    yield SimpleNamespace(storage=storage, root=root, env=stack.env)
    delete_urls(list(list_urls(root, storage)), storage)


# ==================================================================================================
# A real two-host Ray cluster (tests/integration/multihost.py): a head with its own stack bound to a
# veth address, a worker node in its own network, PID and mount namespaces. Needs root.
#
#   def test_x(two_hosts):   # two_hosts.env (client env), .gcs, .kill_node(), .start_node(), .nodes()
#
# One cluster per test module; stopped (by PID and namespace name) when the module ends, also after
# a failure. Without root: skipped with the reason, failed under CI=true.
# ==================================================================================================


@pytest.fixture(scope="session")
def private_network() -> None:
    """For tests of SeaweedFS's private network namespace (infra/stack/relay.py): where this machine allows
    none (the stack then falls back), skipped with the reason, failed under CI=true."""
    from infra.stack.relay import private_network_available

    if not private_network_available():
        why = "this machine allows no private network namespace (the stack then falls back: docs/stack.md)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="module")
def two_hosts(request):
    from tests.integration.multihost import TwoHosts, can_make_namespaces

    if reason := can_make_namespaces():
        if os.environ.get("CI") == "true":
            pytest.fail(f"the two-host cluster cannot be made here: {reason}")
        pytest.skip(f"two-host cluster: {reason}")
    hosts = TwoHosts()
    request.addfinalizer(hosts.stop)
    hosts.start()
    return hosts


@pytest.fixture
def index_reads(monkeypatch) -> list[tuple[str, int, int]]:
    """Every ranged read ``pipeline.data.index`` makes through the storage layer: (url, start, bytes returned)."""
    from pipeline.data import index

    seen: list[tuple[str, int, int]] = []
    real = index.read_range

    def counting(url, start, length, storage=None):
        data = real(url, start, length, storage)
        seen.append((url, start, len(data)))
        return data

    monkeypatch.setattr(index, "read_range", counting)
    return seen
