"""KubeRay manifests (RayJob, RayCluster, the Secret they read) for GPU training workers.

One worker group of ``nodes`` pods with ``gpus_per_node`` GPUs each; Ray Train places one worker per
GPU, so pods x GPUs equals ``--cluster.num-workers`` by construction, and ``check`` refuses a manifest
where they differ (also after a hand edit). An elastic range (``--cluster.num-workers 2-4``) becomes
``minReplicas``..``maxReplicas`` pods with Ray's autoscaler on: the job starts on what there is and the
autoscaler adds pods up to the maximum. The head pod gets no CPUs or GPUs for Ray tasks: training
workers and sampling actors land on the GPU pods, the head runs the driver and the control plane.

Credentials: ``s3_auth="keys"`` takes the S3 keys from the Secret; ``"role"`` gives the pods none, for
role-based identity (IRSA / workload identity through ``service_account``, or the nodes' instance
profile). MLflow's login (optional keys) and the Ray token always come from the same Secret.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from infra.deploy.job import TrainJob

API_VERSION = "ray.io/v1"
GPU_RESOURCE = "nvidia.com/gpu"
# Ray reads a worker's GPUs from this limit; the annotation carries the job for a RayCluster, which
# has no entrypoint of its own, so `check` can compare the two there as well.
ENTRYPOINT_ANNOTATION = "ddpm-pipeline/entrypoint"
SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
# MLflow's login: optional keys of the same Secret (an MLflow server without auth needs none).
MLFLOW_KEYS = {
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
}
S3_AUTH = ("keys", "role")
RAY_TOKEN_KEY = "auth_token"  # the key KubeRay's token auth reads in authOptions.secretName


@dataclass(frozen=True)
class KubeRayOptions:
    name: str
    image: str
    namespace: str = "default"
    secret_name: str = "ddpm-secrets"
    ray_version: str = "2.60.0"
    socket_ifname: str = "eth0"
    worker_cpu: str = "8"
    worker_memory: str = "64Gi"
    head_cpu: str = "4"
    head_memory: str = "16Gi"
    shm_size: str = "16Gi"
    ttl_seconds: int = 600
    active_deadline_seconds: int | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    s3_auth: str = "keys"
    service_account: str | None = None
    generate_name: bool = True  # a RayJob gets metadata.generateName: every `kubectl create` a new job


def _env(job: TrainJob, opts: KubeRayOptions) -> list[dict]:
    env = [{"name": k, "value": v} for k, v in sorted(job.env().items())]
    if opts.s3_auth == "keys":
        env += [
            {"name": var, "valueFrom": {"secretKeyRef": {"name": opts.secret_name, "key": key}}}
            for var, key in SECRET_KEYS.items()
        ]
    if "MLFLOW_TRACKING_URI" in job.env():
        env += [
            {"name": var, "valueFrom": {"secretKeyRef": {"name": opts.secret_name, "key": key, "optional": True}}}
            for var, key in MLFLOW_KEYS.items()
        ]
    # gloo/NCCL otherwise take the address the pod's hostname resolves to, which need not be the pod network.
    env += [{"name": "GLOO_SOCKET_IFNAME", "value": opts.socket_ifname}]
    env += [{"name": "NCCL_SOCKET_IFNAME", "value": opts.socket_ifname}]
    return env


def _pod(job: TrainJob, opts: KubeRayOptions, *, container: str, cpu: str, memory: str, gpus: int) -> dict:
    limits = {"cpu": cpu, "memory": memory}
    if gpus:
        limits[GPU_RESOURCE] = str(gpus)
    spec: dict = {
        "containers": [
            {
                "name": container,
                "image": opts.image,
                "env": _env(job, opts),
                "resources": {"limits": limits, "requests": dict(limits)},
                "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
            }
        ],
        # Ray's object store and the DataLoader workers live in /dev/shm; a container's default is 64 MiB.
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm_size}}],
    }
    if gpus and opts.node_selector:
        spec["nodeSelector"] = dict(opts.node_selector)
    if opts.service_account:
        spec["serviceAccountName"] = opts.service_account
    return {"spec": spec}


def ray_cluster_spec(job: TrainJob, opts: KubeRayOptions) -> dict:
    head = _pod(job, opts, container="ray-head", cpu=opts.head_cpu, memory=opts.head_memory, gpus=0)
    head["spec"]["containers"][0]["ports"] = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    worker = _pod(
        job, opts, container="ray-worker", cpu=opts.worker_cpu, memory=opts.worker_memory, gpus=job.gpus_per_node
    )
    spec = {
        "rayVersion": opts.ray_version,
        "authOptions": {"mode": "token", "secretName": opts.secret_name},
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "num-gpus": "0"}, "template": head},
        "workerGroupSpecs": [
            {
                "groupName": "gpu",
                "replicas": job.min_nodes,
                "minReplicas": job.min_nodes,
                "maxReplicas": job.nodes,
                "rayStartParams": {"num-gpus": str(job.gpus_per_node)},
                "template": worker,
            }
        ],
    }
    if job.elastic:
        # Ray Train's elastic group asks for its maximum; the autoscaler adds GPU pods up to maxReplicas.
        spec["enableInTreeAutoscaling"] = True
        spec["autoscalerOptions"] = {"upscalingMode": "Default", "idleTimeoutSeconds": 300}
    return spec


def _metadata(opts: KubeRayOptions, *, generate: bool = False, **annotations: str) -> dict:
    # generateName: a rerun (`kubectl create` again) is a new RayJob, never an edit of a finished one.
    name = {"generateName": opts.name.rstrip("-") + "-"} if generate else {"name": opts.name}
    meta = {**name, "namespace": opts.namespace, "labels": {"app.kubernetes.io/name": "ddpm-pipeline"}}
    if annotations:
        meta["annotations"] = annotations
    return meta


def ray_job(job: TrainJob, opts: KubeRayOptions) -> dict:
    """A RayJob: a cluster made for the training run, deleted ``ttl_seconds`` after it ends."""
    spec = {
        "entrypoint": job.entrypoint(),
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": opts.ttl_seconds,
        # A resubmitted entrypoint would start a new run under a new name; Ray Train already restarts
        # failed worker groups from the last checkpoint (cluster.max_failures).
        "backoffLimit": 0,
        "rayClusterSpec": ray_cluster_spec(job, opts),
    }
    if opts.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = opts.active_deadline_seconds
    meta = _metadata(opts, generate=opts.generate_name)
    return {"apiVersion": API_VERSION, "kind": "RayJob", "metadata": meta, "spec": spec}


def ray_cluster(job: TrainJob, opts: KubeRayOptions) -> dict:
    """A long-lived RayCluster sized for the job; submit the annotated entrypoint with `ray job submit`."""
    meta = _metadata(opts, **{ENTRYPOINT_ANNOTATION: job.entrypoint()})
    return {"apiVersion": API_VERSION, "kind": "RayCluster", "metadata": meta, "spec": ray_cluster_spec(job, opts)}


def secret_template(opts: KubeRayOptions) -> dict:
    """The Secret the pods read, with empty values: fill it (or create it with kubectl) before applying."""
    keys = [*(SECRET_KEYS.values() if opts.s3_auth == "keys" else ()), *MLFLOW_KEYS.values(), RAY_TOKEN_KEY]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": opts.secret_name, "namespace": opts.namespace},
        "type": "Opaque",
        "stringData": dict.fromkeys(keys, ""),
    }
