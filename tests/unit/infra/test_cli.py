"""`python -m infra.stack` / `ddpm-stack` without services: help, and what each command says when
nothing runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


def stack_cli(*args: str, exe: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(exe or [sys.executable, "-m", "infra.stack"]), *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_help_lists_the_commands_and_the_installed_script_is_the_same():
    out = stack_cli("--help")
    assert out.returncode == 0, out.stderr
    for command in ("up", "down", "status", "env"):
        assert command in out.stdout
    script = Path(sys.executable).with_name("ddpm-stack")
    assert script.exists(), "pip install -e . installs the ddpm-stack script"
    assert stack_cli("--help", exe=[str(script)]).stdout == out.stdout
    up = stack_cli("up", "--help")
    for flag in ("--port-offset", "--s3-port", "--mlflow-port", "--ray-dashboard-port", "--ray-port", "--only"):
        assert flag in up.stdout, flag


def test_commands_on_a_state_dir_where_nothing_ran(tmp_path):
    env = stack_cli("env", "--state-dir", str(tmp_path))
    assert env.returncode == 2 and "infra.stack up --state-dir" in env.stderr
    status = stack_cli("status", "--state-dir", str(tmp_path))
    assert status.returncode == 1 and status.stdout.count(" down ") == 3, status.stdout
    down = stack_cli("down", "--state-dir", str(tmp_path))
    assert down.returncode == 0 and "nothing was running" in down.stdout
    bad = stack_cli("up", "--state-dir", str(tmp_path), "--mlflow-port", "8333", "--s3-port", "8333")
    assert bad.returncode == 2 and "overlap" in bad.stderr
