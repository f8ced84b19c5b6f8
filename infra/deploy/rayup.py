"""`ray up` configs (AWS GPU instances, on-prem hosts with ``provider: local``) from the checked-in templates.

The templates keep their comments; the renderer fills in the values (each as a JSON scalar, which is
valid YAML) and sizes the GPU worker nodes from the training job's worker count. The services'
variables and secrets go into a separate 0600 env file that the config copies to every node.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template

from infra.deploy.job import TrainJob
from pipeline.config import REPO_ROOT, ConfigError

TEMPLATES = Path(__file__).resolve().parent / "templates"
TORCH_SPEC = "torch==2.13.0"  # the CUDA build: PyPI's Linux wheels of torch are CUDA builds

# GPUs per instance of common AWS GPU types; a type not listed is taken at --gpus-per-node's word.
AWS_GPUS = {
    "g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.8xlarge": 1, "g5.16xlarge": 1,
    "g5.12xlarge": 4, "g5.24xlarge": 4, "g5.48xlarge": 8,
    "g6.xlarge": 1, "g6.2xlarge": 1, "g6.12xlarge": 4, "g6.48xlarge": 8,
    "g6e.xlarge": 1, "g6e.12xlarge": 4, "g6e.48xlarge": 8,
    "p3.2xlarge": 1, "p3.8xlarge": 4, "p3.16xlarge": 8,
    "p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8, "p5e.48xlarge": 8, "p5en.48xlarge": 8,
}  # fmt: skip

S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_LOGIN = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
SECRET_VARS = (*S3_KEYS, *MLFLOW_LOGIN, "RAY_AUTH_TOKEN")
AWS_IFNAME = "ens5"  # the primary interface of AWS Nitro instances (the GPU types above)
PROFILE_MARK = "      # IamInstanceProfile: set by --worker-instance-profile\n"
# One file feeds both `docker --env-file` (takes values literally) and the shell's `.` (would
# interpret quotes): only values that read the same to both are accepted.
ENV_VALUE = re.compile(r"^[A-Za-z0-9_./:@%+=,~-]*$")


@dataclass(frozen=True)
class AwsOptions:
    cluster_name: str
    image: str
    ami: str
    region: str = "us-west-2"
    instance_type: str = "g5.xlarge"
    head_instance_type: str = "m5.2xlarge"
    cpus_per_node: int | None = None
    shm_size: str = "16g"
    worker_instance_profile: str | None = None  # ARN; S3 through the GPU nodes' role instead of keys


@dataclass(frozen=True)
class LocalOptions:
    cluster_name: str
    head_ip: str
    worker_ips: tuple[str, ...]
    ssh_user: str
    ssh_private_key: str = "~/.ssh/id_rsa"
    repo: str = str(REPO_ROOT)
    torch_spec: str = TORCH_SPEC


def _render(template: str, **values) -> str:
    return Template((TEMPLATES / template).read_text()).substitute({k: json.dumps(v) for k, v in values.items()})


def secret_vars(s3_auth: str = "keys") -> tuple[str, ...]:
    """The env file's secrets: with role-based identity (``s3_auth="role"``) no S3 keys at all."""
    return SECRET_VARS if s3_auth == "keys" else tuple(k for k in SECRET_VARS if k not in S3_KEYS)


def checkout(repo: str | None = None) -> Path:
    """The repository `ray up` local copies to the hosts: ``repo``, or the checkout this package runs from.
    An installed package (site-packages) is no checkout: ``ConfigError`` naming --repo."""
    path = Path(repo).expanduser().resolve() if repo else REPO_ROOT
    if not ((path / "pyproject.toml").is_file() and (path / "infra" / "setup.sh").is_file()):
        raise ConfigError(
            f"--repo {path}: not a checkout of ddpm-pipeline (no pyproject.toml and infra/setup.sh); `ray-up local` "
            "copies a checkout to the hosts: pass --repo PATH of one"
        )
    return path


def aws_config(job: TrainJob, opts: AwsOptions, env_file: str) -> str:
    known = AWS_GPUS.get(opts.instance_type)
    if known is not None and known != job.gpus_per_node:
        raise ConfigError(
            f"--instance-type {opts.instance_type} has {known} GPU(s) but --gpus-per-node is {job.gpus_per_node}: "
            f"the job's {job.num_workers} workers would not match the cluster's GPUs"
        )
    if opts.worker_instance_profile and not opts.worker_instance_profile.startswith("arn:"):
        raise ConfigError(
            f"--worker-instance-profile {opts.worker_instance_profile!r}: expected an instance profile ARN"
        )
    cpus = opts.cpus_per_node or 4 * job.gpus_per_node
    if cpus < job.gpus_per_node:
        raise ConfigError(
            f"--cpus-per-node {cpus} is fewer than the node's {job.gpus_per_node} GPU workers (1 CPU each)"
        )
    text = _render(
        "aws-gpu.yaml",
        cluster_name=opts.cluster_name,
        min_nodes=job.min_nodes,
        nodes=job.nodes,
        region=opts.region,
        image=opts.image,
        shm_size=opts.shm_size,
        head_instance_type=opts.head_instance_type,
        instance_type=opts.instance_type,
        ami=opts.ami,
        cpus_per_node=cpus,
        gpus_per_node=job.gpus_per_node,
        env_file=env_file,
    )
    assert PROFILE_MARK in text, "templates/aws-gpu.yaml lost its IamInstanceProfile line"
    if opts.worker_instance_profile:
        profile = json.dumps({"Arn": opts.worker_instance_profile})
        text = text.replace(PROFILE_MARK, f"      IamInstanceProfile: {profile}\n")
    return text


def local_config(job: TrainJob, opts: LocalOptions, env_file: str) -> str:
    if len(opts.worker_ips) != job.nodes:
        raise ConfigError(
            f"--worker-ips names {len(opts.worker_ips)} host(s) but --cluster.num-workers {job.num_workers} at "
            f"{job.gpus_per_node} GPU(s) per node needs {job.nodes}"
        )
    if opts.head_ip in opts.worker_ips or len(set(opts.worker_ips)) != len(opts.worker_ips):
        raise ConfigError("--worker-ips: each host once, and not the head (the head takes no training workers)")
    return _render(
        "onprem.yaml",
        cluster_name=opts.cluster_name,
        head_ip=opts.head_ip,
        worker_ips=list(opts.worker_ips),
        ssh_user=opts.ssh_user,
        ssh_private_key=opts.ssh_private_key,
        repo=opts.repo.rstrip("/") + "/",
        env_file=env_file,
        torch_spec=opts.torch_spec,
        gpus_per_node=job.gpus_per_node,
    )


def node_env(job: TrainJob, socket_ifname: str, secrets: dict[str, str], s3_auth: str = "keys") -> str:
    """The env file every node reads: services' variables, token auth, the NIC for gloo/NCCL, secrets (with
    ``s3_auth="role"`` no S3 keys: an empty key would stop boto3 from using the node's role)."""
    values = {**job.env(), "RAY_AUTH_MODE": "token", "GLOO_SOCKET_IFNAME": socket_ifname}
    values["NCCL_SOCKET_IFNAME"] = socket_ifname
    wanted = secret_vars(s3_auth)
    extra = [k for k in S3_KEYS if secrets.get(k) and k not in wanted]
    if extra:
        raise ConfigError(f"--s3-auth role: {', '.join(extra)} given; role-based identity takes no keys")
    values |= {k: secrets.get(k, "") for k in wanted}
    for k, v in values.items():
        if not ENV_VALUE.match(v):
            raise ConfigError(f"{k}: the value has characters an env file cannot carry unquoted (quotes, spaces, $)")
    lines = [f"{k}={v}" for k, v in values.items()]
    return "\n".join(lines) + "\n"
