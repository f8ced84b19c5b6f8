"""Deployment files, validated offline: KubeRay manifests against the CRD schemas (unknown fields
rejected) plus KubeRay's own rules and the project's (GPUs = workers, secrets only from a Secret);
built-in kinds with kubernetes-validate; `ray up` configs with Ray's own validation, without a network."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from infra.deploy import check, cli, kuberay, rayup
from infra.deploy.job import entrypoint_settings, parse_train_flags
from pipeline.config import ConfigError

TRAIN = ["--cluster.num-workers", "4", "--model.preset", "cifar", "--data.image-size", "32", "--data.channels", "3"]
TRAIN += ["--data.partitions", "4", "--data.hflip", "--model.channel-mult", "[1,2,2]", "--train.precision", "bf16"]
TRAIN += ["--tracking.uri", "http://mlflow.ml:5000", "--storage.endpoint-url", "http://s3.ml:8333"]
TRAIN += ["--data.url", "s3://my-data/cifar"]
OPTS = kuberay.KubeRayOptions(name="ddpm-train", image="registry.example/ddpm:1", namespace="ml")
WORKERS = "spec.rayClusterSpec.workerGroupSpecs[0]"


@pytest.fixture(scope="module")
def job():
    return parse_train_flags(TRAIN, gpus_per_node=2)


@pytest.fixture
def rayjob(job):
    return kuberay.ray_job(job, OPTS)


def problems(doc) -> list[str]:
    return check.manifest_problems(doc)


def test_rendered_rayjob_is_valid_and_runs_the_validated_settings(job, rayjob):
    assert problems(rayjob) == []
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert "runtimeEnvYAML" not in spec
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "ddpm-secrets"}
    group = cluster["workerGroupSpecs"][0]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    pod = group["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"][kuberay.GPU_RESOURCE] == "2"
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "ddpm-secrets",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.ml:5000"
    assert env["NCCL_SOCKET_IFNAME"]["value"] == env["GLOO_SOCKET_IFNAME"]["value"] == "eth0"
    # The entrypoint parses back to the same training settings (endpoints travel as pod env instead).
    again = entrypoint_settings(spec["entrypoint"])
    assert again.cluster.num_workers == 4 and again.cluster.use_gpu == "yes"
    assert again.model.channel_mult == (1, 2, 2) and again.data.hflip and again.train.precision == "bf16"
    assert "mlflow.ml" not in spec["entrypoint"]


def test_raycluster_and_secret_template_are_valid(job):
    cluster = kuberay.ray_cluster(job, OPTS)
    assert problems(cluster) == []
    assert cluster["metadata"]["annotations"][kuberay.ENTRYPOINT_ANNOTATION] == job.entrypoint()
    assert problems(kuberay.secret_template(OPTS)) == []


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["spec"].__setitem__("runtimeEnvYaml", "env_vars: {}"), "spec.runtimeEnvYaml: unknown field"),
        (
            lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("replicas", "2"),
            f"{WORKERS}.replicas",
        ),
        (
            lambda d: d["spec"].__setitem__("runtimeEnvYAML", "env_vars:\n  AWS_SECRET_ACCESS_KEY: abc\n"),
            "spec.runtimeEnvYAML.env_vars.AWS_SECRET_ACCESS_KEY",
        ),
        (
            lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"][3][
                "valueFrom"
            ].__setitem__("secretKeyref", {}),
            "valueFrom.secretKeyref: unknown field",
        ),
        (lambda d: d["spec"].__setitem__("submissionMode", "K8sMode"), "spec.submissionMode"),
        (lambda d: d["spec"].__setitem__("shutdownAfterJobFinishes", False), "spec.ttlSecondsAfterFinished: needs"),
        (lambda d: d["metadata"].__setitem__("name", "d" * 48), "metadata.name: 'dddd"),
        (lambda d: d["metadata"].__setitem__("name", "DDPM_train"), "not a DNS-1035 label"),
        (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("maxReplicas"), "needs minReplicas and max"),
        (
            lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("replicas", 5),
            "outside minReplicas",
        ),
    ],
    ids=[
        "typo-field",
        "string-replicas",
        "secret-in-runtime-env",
        "secretKeyRef-typo",
        "bad-submission-mode",
        "ttl-without-shutdown",
        "name-too-long",
        "name-not-dns",
        "no-max-replicas",
        "replicas-outside-range",
    ],
)
def test_a_broken_rayjob_is_refused_naming_the_field(rayjob, edit, expected):
    broken = copy.deepcopy(rayjob)
    edit(broken)
    found = problems(broken)
    assert any(expected in p for p in found), found


def test_a_secret_as_a_plain_pod_env_value_is_refused(rayjob):
    env = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "RAY_AUTH_TOKEN", "value": "abc"})
    assert any("headGroupSpec.template.spec.containers[0].env[" in p and "secretKeyRef" in p for p in problems(rayjob))


def test_gpus_that_disagree_with_the_worker_count_are_refused_before_anything_is_written(rayjob, tmp_path, capsys):
    group = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["replicas"] = group["minReplicas"] = group["maxReplicas"] = 3
    with pytest.raises(check.CheckError, match=r"6 GPU\(s\) in the worker pods \(3 x 2\).*--cluster.num-workers 4"):
        check.check_documents([rayjob], "rendered rayjob")
    out = tmp_path / "job.yaml"
    argv = ["kuberay", "--image", "i:1", "--gpus-per-node", "2", "-o", str(out), "--", "--cluster.num-workers", "3"]
    argv += ["--train.batch-size", "96"]
    assert cli.main(argv) == 2
    assert "does not fill nodes of 2 GPU(s)" in capsys.readouterr().err and not out.exists()


def test_a_socket_interface_that_disagrees_with_the_nodes_is_refused(tmp_path, capsys):
    out = tmp_path / "job.yaml"
    argv = ["kuberay", "--image", "i:1", "--socket-ifname", "eth0", "-o", str(out), "--"]
    assert cli.main([*argv, "--cluster.num-workers", "2", "--cluster.socket-ifname", "ens5"]) == 2
    assert "--cluster.socket-ifname ens5 disagrees with --socket-ifname eth0" in capsys.readouterr().err
    assert not out.exists()
    assert cli.main([*argv, "--cluster.num-workers", "2", "--cluster.socket-ifname", "eth0"]) == 0 and out.exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--storage.secret-access-key", "abc"], "--storage.secret-access-key: S3 keys come from"),
        (["--cluster.use-gpu", "no"], "--cluster.use-gpu no"),
        (["--cluster.num-wrkers", "4"], "unrecognized arguments: --cluster.num-wrkers"),
    ],
)
def test_bad_training_flags_are_refused(flags, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_train_flags(flags, gpus_per_node=1)


def test_the_renderers_environment_never_reaches_a_manifest(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "leaked-secret-value")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    out = tmp_path / "job.yaml"
    assert cli.main(["kuberay", "--image", "i:1", "--secret-template", "-o", str(out), "--", *TRAIN]) == 0
    text = out.read_text()
    assert "leaked-secret-value" not in text and "127.0.0.1" not in text
    assert cli.main(["check", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"ok {out}"


def test_builtin_kinds_are_checked_with_kubernetes_schemas():
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "ddpm-dashboard"},
        "spec": {"selector": {"ray.io/node-type": "head"}, "ports": [{"name": "dashboard", "port": 8265}]},
    }
    assert problems(service) == []
    service["spec"]["ports"][0]["port"] = "http"
    assert any(p.startswith("spec.ports[0].port:") for p in problems(service)), problems(service)
    secret = kuberay.secret_template(OPTS)
    secret["stringdata"] = secret.pop("stringData")
    assert any("stringdata" in p for p in problems(secret)), problems(secret)


def test_ray_up_configs_pass_rays_own_validation_offline_and_a_typo_fails(job, tmp_path):
    aws = rayup.AwsOptions(cluster_name="ddpm", image="i:1", ami="ami-0123456789abcdef0", instance_type="g5.12xlarge")
    with pytest.raises(ConfigError, match="g5.12xlarge has 4 GPU"):
        rayup.aws_config(job, aws, "/tmp/env")
    four = parse_train_flags(["--cluster.num-workers", "8", "--data.partitions", "8"], gpus_per_node=4)
    local = rayup.LocalOptions(cluster_name="lab", head_ip="10.0.0.1", worker_ips=("10.0.0.2",), ssh_user="me")
    with pytest.raises(ConfigError, match="needs 2"):
        rayup.local_config(job, local, "/tmp/env")
    local = rayup.LocalOptions(**{**local.__dict__, "worker_ips": ("10.0.0.2", "10.0.0.3")})
    files = {
        "aws.yaml": rayup.aws_config(four, aws, "/tmp/env"),
        "local.yaml": rayup.local_config(job, local, "/tmp/env"),
    }
    typo = yaml.safe_load(files["aws.yaml"])
    typo["available_node_types"]["gpu"]["min_worker"] = typo["available_node_types"]["gpu"].pop("min_workers")
    files["typo.yaml"] = yaml.safe_dump(typo)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    found = check.files_problems([tmp_path / n for n in files])
    assert found[tmp_path / "aws.yaml"] == [] and found[tmp_path / "local.yaml"] == []
    assert any("min_worker" in p for p in found[tmp_path / "typo.yaml"]), found
    assert yaml.safe_load(files["aws.yaml"])["available_node_types"]["gpu"]["resources"] == {"CPU": 16, "GPU": 4}


def test_node_env_file_carries_no_value_a_shell_would_reinterpret(job):
    env = rayup.node_env(job, "ens5", {"RAY_AUTH_TOKEN": "ab12"})
    assert "RAY_AUTH_MODE=token\n" in env and "RAY_AUTH_TOKEN=ab12\n" in env and "AWS_SECRET_ACCESS_KEY=\n" in env
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY"):
        rayup.node_env(job, "ens5", {"AWS_SECRET_ACCESS_KEY": "a b$c"})


def test_crd_folder_is_found():
    for version in check.CRD_VERSIONS:
        assert (check.crd_dir(version) / "ray.io_rayjobs.yaml").is_file(), Path(check.crd_dir(version))
