"""A stack that serves other hosts, without starting services: bind addresses, MLflow's login, `join`,
and what training workers on another host get and check (pipeline/train/hosts.py)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from infra.stack import Stack, StackConfig, StackError
from infra.stack.cli import main
from infra.stack.config import check_bind_address
from infra.stack.node import JoinConfig, join_command, read_token
from pipeline.config import Settings
from pipeline.train.hosts import UnreachableError, check_reachable, driver_login, worker_env_vars


def test_bind_address_not_on_this_machine_is_refused(tmp_path, capsys):
    check_bind_address("127.0.0.1")
    with pytest.raises(StackError, match=r"cannot bind to 192\.0\.2\.7: it is not an address of this machine"):
        check_bind_address("192.0.2.7")  # TEST-NET-1: never assigned
    assert main(["up", "--state-dir", str(tmp_path), "--host", "192.0.2.7", "--only", "s3"]) == 2
    assert "not an address of this machine" in capsys.readouterr().err
    with pytest.raises(ValueError, match="IPv4 address"):
        StackConfig(state_dir=tmp_path, host="head.example")


def test_mlflow_asks_for_a_login_on_loopback_and_beyond(tmp_path):
    local = Stack(StackConfig.resolve(state_dir=tmp_path / "a", environ={}))
    local._prepare()
    login = {k: v for k, v in local.env().items() if k.startswith("MLFLOW_TRACKING_") and k != "MLFLOW_TRACKING_URI"}
    assert login["MLFLOW_TRACKING_USERNAME"] == "admin" and len(login["MLFLOW_TRACKING_PASSWORD"]) >= 24
    argv, extra = local._command("mlflow")
    assert argv[argv.index("--app-name") + 1] == "basic-auth" and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert login["MLFLOW_TRACKING_PASSWORD"] in Path(extra["MLFLOW_AUTH_CONFIG_PATH"]).read_text()

    served = Stack(StackConfig.resolve(state_dir=tmp_path / "b", environ={}, host="10.1.2.3"))
    served._prepare()
    env = served.env()
    assert env["MLFLOW_TRACKING_URI"] == f"http://10.1.2.3:{served.config.mlflow_port}"
    argv, extra = served._command("mlflow")
    assert argv[argv.index("--app-name") + 1] == "basic-auth" and argv[argv.index("--host") + 1] == "10.1.2.3"
    ini = Path(extra["MLFLOW_AUTH_CONFIG_PATH"])
    assert ini.stat().st_mode & 0o777 == 0o600 and env["MLFLOW_TRACKING_PASSWORD"] in ini.read_text()
    assert "default_permission = NO_PERMISSIONS" in ini.read_text()
    assert "auth_cache_ttl_seconds = 300" in ini.read_text()  # else a PBKDF2 check on every request
    ray_argv, ray_env = served._command("ray")
    assert "--node-ip-address=10.1.2.3" in ray_argv and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in ray_env
    assert ray_env["MLFLOW_TRACKING_PASSWORD"] == env["MLFLOW_TRACKING_PASSWORD"]  # for job drivers on the head


def test_weed_runs_in_a_private_network_and_only_its_s3_port_is_relayed(private_network, tmp_path):
    local = Stack(StackConfig.resolve(state_dir=tmp_path / "a", environ={}))
    local._prepare()
    assert local.private_network
    argv, port, master = local._command("s3")[0], local.config.s3_port, local.config.weed_ports()["master"]
    at = argv.index("infra.stack.relay")
    assert argv[at + 1 : at + 5] == [
        "--private-network",
        f"127.0.0.1:{port}=127.0.0.1:{port}",
        f"{local.weed_master_socket}=127.0.0.1:{master}",
        "--",
    ]
    assert argv[at + 5 :][1] == "mini" and "-ip.bind=127.0.0.1" in argv

    served = Stack(StackConfig.resolve(state_dir=tmp_path / "b", environ={}, host="10.1.2.3"))
    served._prepare()
    argv, port = served._command("s3")[0], served.config.s3_port
    at = argv.index("--")
    assert argv[argv.index("--private-network") + 1 : at] == [
        f"127.0.0.1:{port}=127.0.0.1:{port}",
        f"10.1.2.3:{port}=127.0.0.1:{port}",
        f"{served.weed_master_socket}=127.0.0.1:{served.config.weed_ports()['master']}",
    ]
    weed = argv[at + 1 :]
    assert weed[1] == "mini" and "-ip=127.0.0.1" in weed and "-ip.bind=127.0.0.1" in weed
    assert not [a for a in weed if "10.1.2.3" in a]
    c = served.config
    assert c.listen_addresses("S3") == ("127.0.0.1", "10.1.2.3") and c.listen_addresses("weed filer") == ("127.0.0.1",)
    assert c.listen_addresses("MLflow") == ("10.1.2.3",)

    served.private_network = False  # a machine without unprivileged namespaces: weed on loopback, S3 relayed
    argv = served._command("s3")[0]
    assert argv[argv.index("infra.stack.relay") + 1 : argv.index("--")] == [f"10.1.2.3:{port}=127.0.0.1:{port}"]
    local.private_network = False
    assert "infra.stack.relay" not in local._command("s3")[0]


def test_join_needs_the_token_and_passes_it_by_environment(tmp_path):
    with pytest.raises(StackError, match="RAY_AUTH_TOKEN or pass --token-file"):
        read_token(None, {})
    with pytest.raises(StackError, match="does not exist"):
        read_token(tmp_path / "nope", {})
    (tmp_path / "tok").write_text("abc\n")
    assert read_token(tmp_path / "tok", {}) == "abc"
    with pytest.raises(StackError, match="IP:PORT"):
        JoinConfig("head.example:6379", "10.0.0.2")
    argv, env = join_command(JoinConfig("10.0.0.1:6379", "10.0.0.2", num_cpus=1), "abc", {"RAY_ADDRESS": "x"})
    assert "--address=10.0.0.1:6379" in argv and "--block" in argv and "--num-cpus=1" in argv
    assert env["RAY_AUTH_TOKEN"] == "abc" and env["RAY_AUTH_MODE"] == "token" and "RAY_ADDRESS" not in env
    assert not any("abc" in a for a in argv)  # the token is not on the command line (ps shows it)


def test_workers_get_the_interface_and_the_login_but_not_in_the_runtime_env():
    s = Settings.from_cli(["--cluster.socket-ifname", "eth1"])
    assert worker_env_vars(s) == {"GLOO_SOCKET_IFNAME": "eth1", "NCCL_SOCKET_IFNAME": "eth1"}
    assert worker_env_vars(Settings.from_cli([])) == {}
    env = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "pw", "OTHER": "x"}
    assert driver_login(env) == {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "pw"}


def test_unreachable_service_names_the_host_and_the_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(UnreachableError, match=rf"worker host {socket.gethostname()} .* cannot reach S3 at {url}"):
        check_reachable({"S3": url}, timeout=2)


def test_a_service_that_comes_up_late_is_waited_for_within_the_bound(capfd):
    """A worker starting while S3 is away waits for it (up to storage.outage_s), then goes on; past the
    bound it fails naming the endpoint and the wait. A real listener that opens 2 s late."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    opened = threading.Event()

    def open_late():
        time.sleep(2.0)
        with socket.create_server(("127.0.0.1", port)) as server:
            opened.set()
            server.settimeout(30)
            server.accept()[0].close()

    late = threading.Thread(target=open_late, daemon=True)
    late.start()
    t0 = time.monotonic()
    check_reachable({"S3": url}, timeout=2, wait_s=60)
    waited = time.monotonic() - t0
    late.join(timeout=30)
    assert opened.is_set() and 2.0 <= waited < 15, waited
    assert f"waiting for S3 at {url}" in capfd.readouterr().err

    t0 = time.monotonic()
    with pytest.raises(
        UnreachableError, match=rf"cannot reach S3 at {url}: .*\(waited [12] s, storage\.outage_s=1\.5\)"
    ):
        check_reachable({"S3": url}, timeout=1, wait_s=1.5)
    assert 1.5 <= time.monotonic() - t0 < 5


def test_a_state_dir_from_before_the_mlflow_login_gets_one(tmp_path):
    old = {"access_key": "DDPMOLDKEY", "secret_key": "s", "mlflow_username": "admin", "mlflow_password": "p"}
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "credentials.json").write_text(json.dumps(old))
    stack = Stack(StackConfig.resolve(state_dir=tmp_path, environ={}))
    stack._prepare()
    creds = json.loads((tmp_path / "credentials.json").read_text())
    assert creds.items() >= old.items() and len(creds["mlflow_csrf_key"]) >= 32  # kept what was there
    assert stack._command("mlflow")[1]["MLFLOW_FLASK_SERVER_SECRET_KEY"] == creds["mlflow_csrf_key"]
