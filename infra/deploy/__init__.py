"""Deployment beyond one machine: KubeRay manifests and `ray up` configs rendered from the training flags,
and their offline validation (see docs/deploy.md).

    python -m infra.deploy kuberay --image IMG [--namespace NS] [--gpus-per-node G] ... -- <jobs/train.py flags>
    python -m infra.deploy ray-up aws|local [...] -- <jobs/train.py flags>
    python -m infra.deploy check FILE...

    job.py        the training job's flags -> validated settings -> entrypoint and the nodes' variables
    kuberay.py    RayJob / RayCluster / Secret manifests
    rayup.py      `ray up` configs from templates/ (AWS GPU instances, provider: local)
    check.py      CRD schemas (strict), KubeRay's own rules, GPUs = workers, secrets; kubernetes-validate; Ray's config check
    cli.py        the command line
"""

from infra.deploy.cli import main

__all__ = ["main"]
