"""Deployment beyond one machine: KubeRay manifests and `ray up` configs rendered from the training flags,
and their offline validation (see docs/deploy.md).

    python -m infra.deploy kuberay --image IMG [--job train|sample] [--namespace NS] [--gpus-per-node G] ... -- <job flags>
    python -m infra.deploy ray-up aws|local [...] -- <jobs/train.py flags>
    python -m infra.deploy check FILE...

    job.py        the job's flags (jobs/train.py or jobs/sample.py) -> validated settings -> entrypoint, env
    kuberay.py    RayJob / RayCluster / Secret manifests
    rayup.py      `ray up` configs from templates/ (AWS GPU instances, provider: local)
    check.py      CRD schemas (strict), KubeRay's own rules, GPUs = workers, secrets; kubernetes-validate; Ray's config check
    crds/         KubeRay's CRDs, v1.6.0 (the minimum) and v1.7.0, with their source (crds/README.md)
    image/        files the image (infra/Dockerfile) copies
    cli.py        the command line
"""

from infra.deploy.cli import main

__all__ = ["main"]
