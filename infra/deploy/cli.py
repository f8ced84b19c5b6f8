"""The command line: render KubeRay manifests or `ray up` configs from the training flags, check files."""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shlex
import sys
import tempfile
from pathlib import Path

import yaml

from infra.deploy import check, kuberay, rayup
from infra.deploy.job import parse_train_flags
from pipeline.config import ConfigError

EPILOG = (
    "Everything after `--` is a flag of jobs/train.py (or, with --job sample, jobs/sample.py), validated by "
    "the pipeline's own settings."
)
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _dump(docs: list[dict]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False, width=1000)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _job(args, train_flags: list[str]):
    """The validated job; its ``--cluster.socket-ifname``, if given, must be the interface the
    rendered nodes export (the job's runtime env would otherwise override the nodes' value)."""
    job = parse_train_flags(train_flags, args.gpus_per_node, getattr(args, "job", "train"))
    given = job.settings.cluster.socket_ifname
    if given and given != args.socket_ifname:
        raise ConfigError(
            f"--cluster.socket-ifname {given} disagrees with --socket-ifname {args.socket_ifname}: pass the same "
            "interface to both, or only --socket-ifname"
        )
    return job


def _kuberay(args, train_flags: list[str]) -> int:
    versions = check.crd_versions(args.operator_version)  # an operator below the minimum: refused first
    if not args.secret_name or not DNS_1123.match(args.secret_name) or len(args.secret_name) > 253:
        raise ConfigError(
            f"--secret-name {args.secret_name!r}: name the Secret that holds the Ray token (key auth_token), "
            "the MLflow login and, with --s3-auth keys, the S3 keys (a DNS-1123 name, e.g. ddpm-secrets)"
        )
    if args.service_account and not DNS_1123.match(args.service_account):
        raise ConfigError(f"--service-account {args.service_account!r}: not a DNS-1123 name")
    if args.service_account and args.s3_auth == "keys":
        raise ConfigError(
            "--service-account is for --s3-auth role (IRSA / workload identity); with keys from the Secret drop it"
        )
    bad = [kv for kv in args.node_selector if "=" not in kv]
    if bad:
        raise ConfigError(f"--node-selector {bad[0]!r}: expected KEY=VALUE")
    name = args.name or f"ddpm-{args.job}"
    job = _job(args, train_flags)
    selector = dict(kv.split("=", 1) for kv in args.node_selector)
    opts = kuberay.KubeRayOptions(
        name=name,
        image=args.image,
        namespace=args.namespace,
        secret_name=args.secret_name,
        ray_version=args.ray_version,
        socket_ifname=args.socket_ifname,
        worker_cpu=args.worker_cpu,
        worker_memory=args.worker_memory,
        head_cpu=args.head_cpu,
        head_memory=args.head_memory,
        shm_size=args.shm_size,
        ttl_seconds=args.ttl_seconds,
        active_deadline_seconds=args.active_deadline_seconds,
        node_selector=selector,
        s3_auth=args.s3_auth,
        service_account=args.service_account,
    )
    docs = [kuberay.ray_job(job, opts) if args.kind == "rayjob" else kuberay.ray_cluster(job, opts)]
    if args.secret_template:
        docs.insert(0, kuberay.secret_template(opts))
    check.check_documents(docs, f"rendered {args.kind}", versions)  # refused here, before anything is written
    text = _dump(docs)
    pods = f"{job.min_nodes}-{job.nodes}" if job.elastic else f"{job.nodes}"
    if args.out == "-":
        sys.stdout.write(text)
    else:
        _write(Path(args.out), text)
        named = f"named {name}-<random>, `kubectl create -f`" if args.kind == "rayjob" else f"{name!r}"
        print(f"wrote {args.out}: {args.kind} ({named}), {pods} pod(s) x {job.gpus_per_node} GPU(s)", file=sys.stderr)
    if args.kind == "raycluster":
        print(f"submit with: ray job submit -- {job.entrypoint()}", file=sys.stderr)
    return 0


def _ray_up(args, train_flags: list[str]) -> int:
    if args.socket_ifname is None:
        if args.provider == "local":
            raise ConfigError(
                "ray-up local needs --socket-ifname: the hosts' network interface for gloo/NCCL "
                "(`ip -br addr` on a host; e.g. eth0, eno1)"
            )
        args.socket_ifname = rayup.AWS_IFNAME
    if args.provider == "aws" and args.s3_auth == "role" and not args.worker_instance_profile:
        raise ConfigError(
            "--s3-auth role needs --worker-instance-profile ARN: the GPU nodes' instance profile with S3 access "
            "(Ray gives only the head a profile of its own)"
        )
    if args.worker_instance_profile and args.provider != "aws":
        raise ConfigError("--worker-instance-profile is for ray-up aws")
    job = _job(args, train_flags)
    out = Path(args.out).expanduser().resolve()
    env_path = out / f"{args.cluster_name}.env"
    if args.provider == "aws":
        if not args.image or not args.ami:
            raise ConfigError(
                "ray-up aws needs --image (built from infra/Dockerfile) and --ami (a GPU AMI of --region)"
            )
        opts = rayup.AwsOptions(
            cluster_name=args.cluster_name,
            image=args.image,
            ami=args.ami,
            region=args.region,
            instance_type=args.instance_type,
            head_instance_type=args.head_instance_type,
            cpus_per_node=args.cpus_per_node,
            worker_instance_profile=args.worker_instance_profile,
        )
        config = rayup.aws_config(job, opts, str(env_path))
    else:
        if not args.head_ip or not args.worker_ips or not args.ssh_user:
            raise ConfigError("ray-up local needs --head-ip, --worker-ips and --ssh-user")
        opts = rayup.LocalOptions(
            cluster_name=args.cluster_name,
            head_ip=args.head_ip,
            worker_ips=tuple(args.worker_ips.split(",")),
            ssh_user=args.ssh_user,
            ssh_private_key=args.ssh_private_key,
            repo=str(rayup.checkout(args.repo)),
        )
        config = rayup.local_config(job, opts, str(env_path))
    wanted = rayup.secret_vars(args.s3_auth)
    given = {k: os.environ[k] for k in wanted if args.secrets_from_env and os.environ.get(k)}
    given.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    env = rayup.node_env(job, args.socket_ifname, given, args.s3_auth)
    config_path = out / f"{args.cluster_name}.yaml"
    with tempfile.TemporaryDirectory(prefix="ddpm-ray-up-") as tmp:  # nothing under --out before it passes
        staged = Path(tmp) / f"{args.cluster_name}.yaml"
        _write(staged, config)
        problems = check.ray_up_problems([staged])[staged]
    if problems:
        raise check.CheckError("\n".join(f"rendered ray up config: {p}" for p in problems))
    _write(config_path, config)
    _write(env_path, env, 0o600)
    missing = [k for k in wanted if not given.get(k)]
    nodes = f"{job.min_nodes}-{job.nodes}" if job.elastic else f"{job.nodes}"
    print(f"wrote {config_path} ({nodes} GPU node(s) x {job.gpus_per_node}) and {env_path} (0600)")
    if missing:
        print(f"fill in {', '.join(missing)} in {env_path} before `ray up` (the MLflow login only if it asks for one)")
    print("then:")
    print(f"  ray up -y {shlex.quote(str(config_path))}")
    print(f"  ray dashboard {shlex.quote(str(config_path))} &     # forwards the dashboard to localhost:8265")
    print(f"  set -a; . {shlex.quote(str(env_path))}; set +a      # RAY_AUTH_MODE/RAY_AUTH_TOKEN for the client")
    print(f"  ray job submit --address http://127.0.0.1:8265 -- {job.entrypoint()}")
    print("  ray job submit --address http://127.0.0.1:8265 -- python -m jobs.sample --run-id <the run's id>")
    return 0


def _check(args) -> int:
    bad = 0
    versions = check.crd_versions(args.operator_version)
    for name, problems in check.files_problems([Path(f) for f in args.files], versions).items():
        if problems:
            bad += 1
            print("\n".join(problems))
        else:
            print(f"ok {name}")
    return 1 if bad else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infra.deploy", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    k = sub.add_parser("kuberay", help="a RayJob (or RayCluster) for GPU training workers", epilog=EPILOG)
    k.add_argument("--image", required=True, help="the project's image (infra/Dockerfile)")
    k.add_argument("--namespace", default="default")
    k.add_argument(
        "--job", choices=["train", "sample"], default="train", help="jobs/train.py, or jobs/sample.py (evaluation)"
    )
    k.add_argument(
        "--name",
        default=None,
        help="a RayJob's generateName prefix (the API server appends 5 characters: `kubectl create -f`), a "
        "RayCluster's name; default ddpm-<job>",
    )
    k.add_argument("--kind", choices=["rayjob", "raycluster"], default="rayjob")
    k.add_argument(
        "--operator-version",
        default=None,
        help=f"your KubeRay operator's release: validate against its CRDs (>= {check.MIN_OPERATOR}); "
        f"default: every shipped release ({', '.join(check.CRD_VERSIONS)})",
    )
    k.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per worker pod; pods = workers / this")
    k.add_argument("--worker-cpu", default="8")
    k.add_argument("--worker-memory", default="64Gi")
    k.add_argument("--head-cpu", default="4")
    k.add_argument("--head-memory", default="16Gi")
    k.add_argument("--shm-size", default="16Gi", help="size of the /dev/shm memory volume of each pod")
    k.add_argument(
        "--secret-name",
        default="ddpm-secrets",
        help="Secret with the Ray token (auth_token), the MLflow login and, with --s3-auth keys, the S3 keys",
    )
    k.add_argument("--secret-template", action="store_true", help="also emit that Secret with empty values")
    k.add_argument(
        "--s3-auth",
        choices=["keys", "role"],
        default="keys",
        help="keys: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from the Secret; role: none, the pods' identity "
        "(IRSA / workload identity with --service-account, or the nodes' instance profile)",
    )
    k.add_argument("--service-account", default=None, help="the pods' ServiceAccount (--s3-auth role)")
    k.add_argument("--socket-ifname", default="eth0", help="pod network interface for gloo/NCCL")
    k.add_argument("--ray-version", default="2.60.0")
    k.add_argument("--ttl-seconds", type=int, default=600, help="delete the cluster this long after the job")
    k.add_argument("--active-deadline-seconds", type=int, default=None)
    k.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE", help="for the GPU pods")
    k.add_argument("-o", "--out", default="-", help="output file (default: stdout)")

    r = sub.add_parser("ray-up", help="a `ray up` config for AWS GPU instances or your own hosts", epilog=EPILOG)
    r.add_argument("provider", choices=["aws", "local"])
    r.add_argument("--cluster-name", default="ddpm")
    r.add_argument("--gpus-per-node", type=int, default=1)
    r.add_argument(
        "--socket-ifname",
        default=None,
        help=f"the nodes' network interface for gloo/NCCL (aws: {rayup.AWS_IFNAME}; local: required)",
    )
    r.add_argument(
        "--s3-auth",
        choices=["keys", "role"],
        default="keys",
        help="keys: S3 keys in the env file; role: none (aws: --worker-instance-profile; local: the hosts' own)",
    )
    r.add_argument("--worker-instance-profile", help="aws: IAM instance profile ARN for the GPU nodes (S3 access)")
    r.add_argument("--repo", default=None, help="local: the checkout to copy to the hosts (default: this one)")
    r.add_argument("--out", default="~/.ddpm/clusters", help="folder for <cluster>.yaml and <cluster>.env")
    r.add_argument(
        "--secrets-from-env",
        action="store_true",
        help="copy the S3 keys, the MLflow login and RAY_AUTH_TOKEN from this shell's environment",
    )
    r.add_argument("--image", help="aws: the project's image (infra/Dockerfile)")
    r.add_argument("--ami", help="aws: GPU AMI with Docker and the NVIDIA container toolkit")
    r.add_argument("--region", default="us-west-2")
    r.add_argument("--instance-type", default="g5.xlarge")
    r.add_argument("--head-instance-type", default="m5.2xlarge")
    r.add_argument("--cpus-per-node", type=int, default=None, help="aws: Ray CPUs per GPU node (default 4 per GPU)")
    r.add_argument("--head-ip", help="local: the head host")
    r.add_argument("--worker-ips", help="local: comma-separated GPU hosts, one per node")
    r.add_argument("--ssh-user", help="local: SSH user on every host")
    r.add_argument("--ssh-private-key", default="~/.ssh/id_rsa")

    c = sub.add_parser("check", help="validate manifests and `ray up` configs offline")
    c.add_argument("--operator-version", default=None, help="validate against this KubeRay release's CRDs only")
    c.add_argument("files", nargs="+")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, train_flags = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = parser().parse_args(own)
    try:
        if args.command == "check":
            return _check(args)
        if args.command == "kuberay":
            return _kuberay(args, train_flags)
        return _ray_up(args, train_flags)
    except (ConfigError, check.CheckError) as e:
        print(e, file=sys.stderr)
        return 2
