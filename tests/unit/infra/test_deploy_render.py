"""Issue 22's findings on the rendered files: elastic ranges, MLflow's login, role-based identity, unique
RayJob names, a sampling RayJob, `ray up`'s GPU options and interface, and bad input refused before any
file is written, naming the flag."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from infra.deploy import check, cli, kuberay, rayup
from infra.deploy.job import entrypoint_settings, parse_train_flags
from pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parents[3]
DATA = ["--data.url", "s3://my-data/cifar", "--model.preset", "cifar", "--data.image-size", "32"]
DATA += ["--data.channels", "3", "--tracking.uri", "http://mlflow.ml:5000"]
OPTS = kuberay.KubeRayOptions(name="ddpm-train", image="registry.example/ddpm:1", namespace="ml")


def render(tmp_path, *argv: str) -> tuple[int, Path]:
    out = tmp_path / "out.yaml"
    return cli.main(["kuberay", "--image", "i:1", "-o", str(out), *argv]), out


def env_of(pod_spec: dict) -> dict[str, dict]:
    return {e["name"]: e for e in pod_spec["containers"][0]["env"]}


def test_an_elastic_range_renders_to_min_max_pods_with_the_autoscaler(tmp_path, capsys):
    code, out = render(tmp_path, "--gpus-per-node", "2", "--", "--cluster.num-workers", "2-4", *DATA)
    assert code == 0, capsys.readouterr().err
    doc = yaml.safe_load(out.read_text())
    cluster = doc["spec"]["rayClusterSpec"]
    group = cluster["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (1, 1, 2)
    assert cluster["enableInTreeAutoscaling"] is True
    assert entrypoint_settings(doc["spec"]["entrypoint"]).cluster.num_workers == "2-4"
    assert check.manifest_problems(doc) == []
    # Without the autoscaler KubeRay never adds the pods above minReplicas.
    del cluster["enableInTreeAutoscaling"]
    assert any("enableInTreeAutoscaling" in p for p in check.manifest_problems(doc))
    # Pods that do not match the range.
    cluster["enableInTreeAutoscaling"] = True
    group["maxReplicas"] = 3
    assert any("2..6 GPU(s)" in p and "--cluster.num-workers 2-4" in p for p in check.manifest_problems(doc))


def test_a_range_that_does_not_fill_whole_pods_is_refused_naming_the_flag(tmp_path, capsys):
    code, out = render(tmp_path, "--gpus-per-node", "2", "--", "--cluster.num-workers", "3-4", *DATA)
    assert code == 2 and not out.exists()
    assert "--cluster.num-workers 3-4 does not fill nodes of 2 GPU(s)" in capsys.readouterr().err


def test_mlflow_login_comes_from_the_same_secret_as_the_s3_keys():
    job = parse_train_flags(["--cluster.num-workers", "2", *DATA], 1)
    doc = kuberay.ray_job(job, OPTS)
    for group in [doc["spec"]["rayClusterSpec"]["headGroupSpec"], *doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]]:
        env = env_of(group["template"]["spec"])
        for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY"):
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "ddpm-secrets" and ref["key"] == var
        assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert check.manifest_problems(doc) == []
    secret = kuberay.secret_template(OPTS)
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "auth_token"} <= set(secret["stringData"])
    env = rayup.node_env(job, "ens5", {"MLFLOW_TRACKING_PASSWORD": "pw"})
    assert "MLFLOW_TRACKING_PASSWORD=pw\n" in env and "MLFLOW_TRACKING_USERNAME=\n" in env


def test_role_based_identity_renders_no_keys(tmp_path, capsys):
    argv = ["--s3-auth", "role", "--service-account", "ddpm-s3", "--secret-template"]
    code, out = render(tmp_path, *argv, "--", "--cluster.num-workers", "2", *DATA)
    assert code == 0, capsys.readouterr().err
    secret, doc = yaml.safe_load_all(out.read_text())
    assert "AWS_ACCESS_KEY_ID" not in secret["stringData"] and "auth_token" in secret["stringData"]
    for group in [doc["spec"]["rayClusterSpec"]["headGroupSpec"], *doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == "ddpm-s3"
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env_of(pod))
    assert cli.main(["check", str(out)]) == 0
    code, out = render(tmp_path, "--service-account", "ddpm-s3", "--", "--cluster.num-workers", "2")
    assert code == 2 and "--service-account is for --s3-auth role" in capsys.readouterr().err


def test_ray_up_role_based_identity_gives_the_gpu_nodes_a_profile_and_no_keys(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-the-shell")
    base = ["ray-up", "aws", "--image", "i:1", "--ami", "ami-0123456789abcdef0", "--out", str(tmp_path)]
    base += ["--secrets-from-env", "--s3-auth", "role"]
    assert cli.main([*base, "--", "--cluster.num-workers", "1", *DATA]) == 2
    assert "--s3-auth role needs --worker-instance-profile" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    arn = "arn:aws:iam::123456789012:instance-profile/ddpm-s3"
    assert cli.main([*base, "--worker-instance-profile", arn, "--", "--cluster.num-workers", "1", *DATA]) == 0
    config = yaml.safe_load((tmp_path / "ddpm.yaml").read_text())
    assert config["available_node_types"]["gpu"]["node_config"]["IamInstanceProfile"] == {"Arn": arn}
    env = (tmp_path / "ddpm.env").read_text()
    assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env and "RAY_AUTH_TOKEN=" in env


def test_ray_up_aws_gives_gpus_to_the_gpu_workers_only(tmp_path):
    job = parse_train_flags(["--cluster.num-workers", "2-4", *DATA], 1)
    aws = rayup.AwsOptions(cluster_name="ddpm", image="i:1", ami="ami-0123456789abcdef0")
    config = yaml.safe_load(rayup.aws_config(job, aws, "/tmp/env"))
    docker = config["docker"]
    assert not any("--gpus" in o for o in docker["run_options"] + docker.get("head_run_options", []))
    assert "--gpus all" in docker["worker_run_options"]
    gpu = config["available_node_types"]["gpu"]
    assert (gpu["min_workers"], gpu["max_workers"], config["max_workers"]) == (2, 4, 4)
    (tmp_path / "aws.yaml").write_text(yaml.safe_dump(config))
    assert check.files_problems([tmp_path / "aws.yaml"])[tmp_path / "aws.yaml"] == []


def test_ray_up_local_needs_its_interface_and_a_checkout(tmp_path, capsys):
    base = ["ray-up", "local", "--head-ip", "10.0.0.1", "--worker-ips", "10.0.0.2", "--ssh-user", "me"]
    base += ["--out", str(tmp_path)]
    assert cli.main([*base, "--", "--cluster.num-workers", "1"]) == 2
    assert "ray-up local needs --socket-ifname" in capsys.readouterr().err and list(tmp_path.iterdir()) == []
    site = tmp_path / "site-packages"
    site.mkdir()
    assert cli.main([*base, "--socket-ifname", "eno1", "--repo", str(site), "--", "--cluster.num-workers", "1"]) == 2
    assert "--repo" in capsys.readouterr().err and not (tmp_path / "ddpm.yaml").exists()
    assert cli.main([*base, "--socket-ifname", "eno1", "--", "--cluster.num-workers", "1"]) == 0
    assert "GLOO_SOCKET_IFNAME=eno1\n" in (tmp_path / "ddpm.env").read_text()
    assert rayup.checkout() == ROOT


def test_a_rayjob_gets_a_unique_name_per_create(tmp_path):
    code, out = render(tmp_path, "--", "--cluster.num-workers", "2")
    assert code == 0
    meta = yaml.safe_load(out.read_text())["metadata"]
    assert meta["generateName"] == "ddpm-train-" and "name" not in meta
    doc = yaml.safe_load(out.read_text())
    assert check.manifest_problems(doc) == []
    doc["metadata"]["generateName"] = "d" * 43 + "-"
    assert any(p.startswith("metadata.generateName:") and "at most 47" in p for p in check.manifest_problems(doc))
    cluster = kuberay.ray_cluster(parse_train_flags(["--cluster.num-workers", "2"], 1), OPTS)
    assert cluster["metadata"]["name"] == "ddpm-train"  # a long-lived RayCluster keeps its name


def test_a_sampling_rayjob_runs_jobs_sample_on_as_many_gpus_as_actors(tmp_path, capsys):
    argv = ["--job", "sample", "--gpus-per-node", "2", "--"]
    code, out = render(tmp_path, *argv, "--run-id", "abc123", "--workers", "4", "--num-images", "1000")
    assert code == 0, capsys.readouterr().err
    doc = yaml.safe_load(out.read_text())
    assert doc["metadata"]["generateName"] == "ddpm-sample-"
    entry = shlex.split(doc["spec"]["entrypoint"])
    assert entry[:3] == ["python", "-m", "jobs.sample"] and entry[entry.index("--run-id") + 1] == "abc123"
    assert doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2
    assert check.manifest_problems(doc) == []
    doc["spec"]["entrypoint"] = doc["spec"]["entrypoint"].replace("--workers 4", "--workers 6")
    assert any("--workers 6" in p for p in check.manifest_problems(doc))
    code, _ = render(tmp_path, *argv, "--run-id", "abc123", "--workers", "3")
    assert code == 2 and "--workers 3 does not fill nodes of 2 GPU(s)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--secret-name", "", "--", "--cluster.num-workers", "2"], "--secret-name ''"),
        (["--secret-name", "Bad_Name", "--", "--cluster.num-workers", "2"], "--secret-name 'Bad_Name'"),
        (["--", "--cluster.num-workers", "2", "--storage.access-key-id", "AKIA"], "--storage.access-key-id"),
        (["--gpus-per-node", "4", "--", "--cluster.num-workers", "2"], "--cluster.num-workers 2 does not fill"),
        (["--", "--cluster.num-workers", "2", *DATA[2:]], "--data.url: the default s3://ddpm-data/digits"),
        (["--operator-version", "1.5.1", "--", "--cluster.num-workers", "2"], "--operator-version 1.5.1"),
        (["--node-selector", "gpu", "--", "--cluster.num-workers", "2"], "--node-selector 'gpu'"),
    ],
    ids=["no-secret-name", "bad-secret-name", "secret-flag", "partial-pods", "digits-fallback", "old-operator", "sel"],
)
def test_bad_kuberay_input_is_refused_before_any_file_naming_the_flag(tmp_path, capsys, argv, expected):
    code, out = render(tmp_path, *argv)
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert not out.exists()


def test_a_gpu_count_the_instance_type_lacks_is_refused_before_any_file(tmp_path, capsys):
    argv = ["ray-up", "aws", "--image", "i:1", "--ami", "ami-0123456789abcdef0", "--out", str(tmp_path / "c")]
    argv += ["--instance-type", "g5.xlarge", "--gpus-per-node", "4", "--", "--cluster.num-workers", "4"]
    assert cli.main(argv) == 2
    assert "--instance-type g5.xlarge has 1 GPU(s) but --gpus-per-node is 4" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def readme_commands() -> list[list[str]]:
    """The `python -m infra.deploy` commands of README's "Run on a cluster", as argv after the module."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Run on a cluster") :]
    section = section[: section.index("\n## ", 1)]
    joined = re.sub(r"\\\n\s*", " ", section)
    cmds = []
    for line in joined.splitlines():
        line = line.split("  #")[0].strip()
        if line.startswith(".venv/bin/python -m infra.deploy ") and "check" not in line.split()[3:4]:
            cmds.append(shlex.split(line)[3:])
    return cmds


def test_readmes_deploy_commands_render(tmp_path, monkeypatch, capsys):
    cmds = readme_commands()
    assert any(c[0] == "kuberay" for c in cmds) and any(c[:2] == ["ray-up", "aws"] for c in cmds), cmds
    for argv in cmds:
        argv = [a if "$" not in a else "x" for a in argv]
        if "-o" in argv:
            argv[argv.index("-o") + 1] = str(tmp_path / "k.yaml")
        elif argv[0] == "ray-up":
            argv = [*argv[: argv.index("--")], "--out", str(tmp_path), *argv[argv.index("--") :]]
        assert cli.main(argv) == 0, (argv, capsys.readouterr().err)
        if argv[:2] == ["ray-up", "aws"]:
            entry = (tmp_path / "ddpm.yaml").read_text()
            assert "ddpm" in entry
            flags = argv[argv.index("--") :]
            assert "--data.url" in flags  # without it the job falls back to the 8x8 digits
    with pytest.raises(ConfigError, match="--data.url"):
        parse_train_flags(DATA[2:], 1)
