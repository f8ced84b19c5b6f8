"""The training job a deployment runs, built from the pipeline's own settings.

The flags after ``--`` are parsed by ``pipeline.config.Settings`` (the same parser as ``jobs/train.py``)
and validated before anything is rendered; the entrypoint is then written back from the validated
settings, so the manifest, the worker count and the job's flags come from one object. The renderer's
own environment (a developer's local stack, their S3 keys) never leaks into a manifest: only flags count.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, SecretStr

from pipeline.config import ConfigError, Settings

ENTRYPOINT = ["python", "-m", "jobs.train"]

# Flags a deployment must not carry: secrets belong in a Secret (a RayJob's spec and `ray job` logs are
# readable by anyone who can list jobs), and the job's Ray address is the cluster it is submitted to.
FORBIDDEN_FLAGS = {
    ("storage", "access_key_id"): "S3 keys come from the Kubernetes Secret / the nodes' env file, never from flags",
    ("storage", "secret_access_key"): "S3 keys come from the Kubernetes Secret / the nodes' env file, never from flags",
    ("cluster", "address"): "the job runs on the cluster it is submitted to; drop --cluster.address",
}

# Service endpoints travel as the services' standard variables on every node, where the workers
# (not only the driver) read them.
ENV_FIELDS = {
    ("storage", "endpoint_url"): "AWS_ENDPOINT_URL",
    ("storage", "region"): "AWS_DEFAULT_REGION",
    ("tracking", "uri"): "MLFLOW_TRACKING_URI",
}


ALWAYS_SHOWN = {("cluster", "num_workers"), ("cluster", "use_gpu")}


class FlagsOnlySettings(Settings):
    """``Settings`` from command-line flags alone: neither the environment nor $DDPM_ENV_FILE."""

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return (init_settings,)


@dataclass(frozen=True)
class TrainJob:
    settings: Settings
    gpus_per_node: int

    @property
    def num_workers(self) -> int:
        return self.settings.cluster.num_workers

    @property
    def nodes(self) -> int:
        return self.num_workers // self.gpus_per_node

    def flags(self) -> list[str]:
        return settings_flags(self.settings)

    def entrypoint(self) -> str:
        return shlex.join(ENTRYPOINT + self.flags())

    def env(self) -> dict[str, str]:
        """The services' non-secret variables every node needs (secrets come from elsewhere)."""
        out = {}
        for (section, name), var in ENV_FIELDS.items():
            value = getattr(getattr(self.settings, section), name)
            if value is not None:
                out[var] = str(value)
        return out


def parse_train_flags(argv: list[str], gpus_per_node: int) -> TrainJob:
    """Validate the training flags for GPU workers on nodes of ``gpus_per_node`` GPUs each.

    Raises ``ConfigError`` naming the flag when the settings are invalid, carry a secret, or their
    worker count does not fill whole nodes."""
    if gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node must be at least 1 (got {gpus_per_node}): the workers train on GPUs")
    settings = entrypoint_settings(shlex.join(ENTRYPOINT + list(argv)))
    if settings.dry_run:
        raise ConfigError("--dry-run: a deployment renders the job, drop the flag")
    if settings.cluster.use_gpu == "no":
        raise ConfigError("--cluster.use-gpu no: these manifests run one GPU per training worker; drop the flag")
    settings.cluster.use_gpu = "yes"  # a GPU that fails to show up must stop the job, not fall back to CPU
    workers = settings.cluster.num_workers
    if workers % gpus_per_node:
        raise ConfigError(
            f"--cluster.num-workers {workers} does not fill nodes of {gpus_per_node} GPU(s) "
            f"(one GPU per worker): use a multiple of {gpus_per_node} or another --gpus-per-node"
        )
    job = TrainJob(settings, gpus_per_node)
    # The entrypoint must mean exactly the validated settings: parse it back and compare.
    again = FlagsOnlySettings.from_cli(job.flags(), prog="jobs/train.py")
    again.storage.endpoint_url, again.storage.region = settings.storage.endpoint_url, settings.storage.region
    again.tracking.uri = settings.tracking.uri
    if again.model_dump() != settings.model_dump():
        raise ConfigError(f"internal: the entrypoint flags {job.flags()} do not reproduce the settings")
    return job


def settings_flags(settings: Settings) -> list[str]:
    """The flags that reproduce ``settings``: fields at their default are left out, except the worker
    group's, which a reader of the manifest should see."""
    defaults = Settings.model_construct()
    flags: list[str] = []
    for section in Settings.model_fields:
        value, default = getattr(settings, section), getattr(defaults, section)
        if not isinstance(value, BaseModel):
            continue
        for name in type(value).model_fields:
            if (section, name) in ENV_FIELDS or (section, name) in FORBIDDEN_FLAGS:
                continue
            v = getattr(value, name)
            if v == getattr(default, name) and (section, name) not in ALWAYS_SHOWN:
                continue
            flag = f"--{section}.{name.replace('_', '-')}"
            flags += _flag(flag, v)
    return flags


def _flag(flag: str, v: Any) -> list[str]:
    if isinstance(v, bool):
        return [flag] if v else [flag.replace("--", "--no-", 1)]
    if isinstance(v, SecretStr):  # pragma: no cover - secrets are refused before
        raise ConfigError(f"{flag}: secrets are never written into a job's flags")
    if isinstance(v, list | tuple):
        return [flag, json.dumps(list(v))]
    return [flag, str(v)]


def entrypoint_settings(entrypoint: str) -> Settings:
    """The training settings an entrypoint's flags give the job; ``ConfigError`` if invalid or carrying a secret."""
    argv = shlex.split(entrypoint)
    if argv[: len(ENTRYPOINT)] != ENTRYPOINT:
        raise ConfigError(f"{entrypoint!r} does not start with {shlex.join(ENTRYPOINT)!r}")
    settings = FlagsOnlySettings.from_cli(argv[len(ENTRYPOINT) :], prog="jobs/train.py")
    for (section, name), why in FORBIDDEN_FLAGS.items():
        if getattr(getattr(settings, section), name) is not None:
            raise ConfigError(f"--{section}.{name.replace('_', '-')}: {why}")
    return settings
