"""StackConfig, the state directory and its private files: no service runs."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from infra.stack import SERVICES, Stack, StackConfig, StackError, load_env
from infra.stack.config import DEFAULT_STATE_DIR, resolve_state_dir, write_private
from infra.stack.services import select


def test_any_s3_port_up_to_65535_is_accepted_and_bad_ports_are_named(tmp_path):
    # The OS hands out ephemeral ports up to ~61000; the S3 port must not drag a derived port past 65535.
    config = StackConfig.resolve(state_dir=tmp_path, environ={}, s3_port=65000)
    ports = [p for group in config.service_ports().values() for p in group.values()]
    assert config.s3_port == 65000 and max(ports) <= 65535 and len(set(ports)) == len(ports)
    with pytest.raises(ValueError, match=r"out of range: \{'weed master.grpc': 70000"):
        StackConfig.resolve(state_dir=tmp_path, environ={}, weed_port_base=60000)
    with pytest.raises(ValueError, match="overlap"):
        StackConfig.resolve(state_dir=tmp_path, environ={}, mlflow_port=8333)


def test_explicit_ports_win_over_variables_over_the_shifted_defaults(tmp_path):
    env = {"DDPM_STACK_PORT_OFFSET": "100", "DDPM_STACK_MLFLOW_PORT": "5555", "DDPM_STACK_DIR": str(tmp_path)}
    c = StackConfig.resolve(environ=env, s3_port=9000)
    assert (c.s3_port, c.mlflow_port, c.ray_dashboard_port, c.ray_port) == (9000, 5555, 8365, 6479)
    assert c.state_dir == tmp_path.resolve()
    assert StackConfig.resolve(state_dir=tmp_path / "x", port_offset=200, environ=env).ray_port == 6579
    assert c.urls == {"s3": "http://127.0.0.1:9000", "mlflow": "http://127.0.0.1:5555", "ray": "http://127.0.0.1:8365"}


def test_state_dir_argument_then_variable_then_repo_default(tmp_path):
    assert resolve_state_dir(tmp_path / "a", {"DDPM_STACK_DIR": str(tmp_path / "b")}) == tmp_path / "a"
    assert resolve_state_dir(None, {"DDPM_STACK_DIR": str(tmp_path / "b")}) == tmp_path / "b"
    assert resolve_state_dir(None, {}) == DEFAULT_STATE_DIR.resolve()


def test_ray_temp_dir_stays_short_for_ray_socket_paths(tmp_path):
    assert StackConfig(state_dir="/tmp/s").ray_temp_dir == Path("/tmp/s/ray")
    deep = StackConfig(state_dir=tmp_path / ("d" * 60)).ray_temp_dir
    assert deep.name.startswith("ddpm-ray-") and len(str(deep)) < len(str(tmp_path))


def test_private_files_are_0600_from_the_start(tmp_path):
    path = tmp_path / "secret.json"
    write_private(path, "{}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".*.tmp"))


def test_env_before_up_names_the_command(tmp_path):
    with pytest.raises(StackError, match="infra.stack up --state-dir"):
        load_env(tmp_path)


def test_from_state_dir_uses_the_ports_up_saved(tmp_path):
    saved = StackConfig.resolve(state_dir=tmp_path, port_offset=300, environ={})
    (tmp_path / "stack.json").write_text(json.dumps(saved.to_json()))
    assert Stack.from_state_dir(tmp_path).config == saved
    assert Stack.from_state_dir(tmp_path / "never-up").config.state_dir == (tmp_path / "never-up").resolve()


def test_services_are_chosen_by_name_in_start_order(tmp_path):
    assert select(["ray", " s3"]) == ["s3", "ray"] and select(SERVICES) == list(SERVICES)
    assert tuple(Stack(StackConfig(state_dir=tmp_path)).services) == SERVICES  # status lists them in this order
    with pytest.raises(StackError, match="unknown services"):
        select(["s3", "minio"])
