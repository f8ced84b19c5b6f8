"""The job a deployment runs (training, or sampling/evaluation), built from the pipeline's own settings.

The flags after ``--`` are parsed by the job's own settings (``pipeline.config.Settings`` for
``jobs/train.py``, ``SampleSettings`` for ``jobs/sample.py``) and validated before anything is rendered;
the entrypoint is then written back from the validated settings, so the manifest, the worker count and
the job's flags come from one object. The renderer's own environment (a developer's local stack, their
S3 keys) never leaks into a manifest: only flags count.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, SecretStr

from pipeline.config import ConfigError, JobSettings, Settings
from pipeline.sample.settings import SampleSettings

ENTRYPOINT = ["python", "-m", "jobs.train"]
SAMPLE_ENTRYPOINT = ["python", "-m", "jobs.sample"]

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

ALWAYS_SHOWN = {("cluster", "num_workers"), ("cluster", "use_gpu"), ("", "workers")}
# The training settings' default dataset: 8x8 grayscale digits (jobs/prepare_data.py puts them there).
DIGITS = ("s3://ddpm-data/digits", 8, 1)


def _flags_only(cls: type[JobSettings]) -> type[JobSettings]:
    """``cls`` parsed from command-line flags alone: neither the environment nor $DDPM_ENV_FILE."""

    class FlagsOnly(cls):
        @classmethod
        def settings_customise_sources(
            cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
        ):
            return (init_settings,)

    FlagsOnly.__name__ = FlagsOnly.__qualname__ = f"FlagsOnly{cls.__name__}"
    return FlagsOnly


FlagsOnlySettings = _flags_only(Settings)
FlagsOnlySampleSettings = _flags_only(SampleSettings)


@dataclass(frozen=True)
class JobKind:
    name: str  # "train" | "sample"
    entrypoint: list[str]
    settings: type[JobSettings]
    prog: str


KINDS = {
    "train": JobKind("train", ENTRYPOINT, FlagsOnlySettings, "jobs/train.py"),
    "sample": JobKind("sample", SAMPLE_ENTRYPOINT, FlagsOnlySampleSettings, "jobs/sample.py"),
}


@dataclass(frozen=True)
class TrainJob:
    """A validated job (training or sampling) and the GPU pods/nodes it runs on."""

    settings: JobSettings
    gpus_per_node: int
    kind: str = "train"

    @property
    def min_workers(self) -> int:
        if self.kind == "sample":
            return self.max_workers
        return self.settings.cluster.min_workers

    @property
    def max_workers(self) -> int:
        if self.kind == "sample":
            return self.settings.workers or self.settings.cluster.max_workers
        return self.settings.cluster.max_workers

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers

    @property
    def num_workers(self) -> int | str:
        """The worker count as the flag reads: ``4``, or ``2-4`` for an elastic group."""
        return f"{self.min_workers}-{self.max_workers}" if self.elastic else self.max_workers

    @property
    def min_nodes(self) -> int:
        return self.min_workers // self.gpus_per_node

    @property
    def nodes(self) -> int:
        """Pods/nodes at most (= at least, unless the group is elastic)."""
        return self.max_workers // self.gpus_per_node

    def flags(self) -> list[str]:
        return settings_flags(self.settings)

    def entrypoint(self) -> str:
        return shlex.join(KINDS[self.kind].entrypoint + self.flags())

    def env(self) -> dict[str, str]:
        """The services' non-secret variables every node needs (secrets come from elsewhere)."""
        out = {}
        for (section, name), var in ENV_FIELDS.items():
            value = getattr(getattr(self.settings, section), name)
            if value is not None:
                out[var] = str(value)
        return out


def parse_train_flags(argv: list[str], gpus_per_node: int, kind: str = "train") -> TrainJob:
    """Validate the job's flags (``kind`` train or sample) for GPU workers on nodes of ``gpus_per_node`` GPUs.

    Raises ``ConfigError`` naming the flag when the settings are invalid, carry a secret, or their
    worker count does not fill whole nodes."""
    if gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node must be at least 1 (got {gpus_per_node}): the workers train on GPUs")
    spec = KINDS[kind]
    settings = entrypoint_settings(shlex.join(spec.entrypoint + list(argv)))
    if settings.dry_run:
        raise ConfigError("--dry-run: a deployment renders the job, drop the flag")
    if settings.cluster.use_gpu == "no":
        raise ConfigError("--cluster.use-gpu no: these manifests run one GPU per worker; drop the flag")
    settings.cluster.use_gpu = "yes"  # a GPU that fails to show up must stop the job, not fall back to CPU
    if kind == "train":
        _check_dataset(settings)
    else:
        settings.workers = settings.workers or settings.cluster.max_workers  # shown in the entrypoint
    job = TrainJob(settings, gpus_per_node, kind)
    flag = "--workers" if kind == "sample" else "--cluster.num-workers"
    for count in sorted({job.min_workers, job.max_workers}):
        if count % gpus_per_node:
            raise ConfigError(
                f"{flag} {job.num_workers} does not fill nodes of {gpus_per_node} GPU(s) (one GPU per worker): "
                f"{'MIN and MAX must each be' if job.elastic else 'use'} a multiple of {gpus_per_node}, "
                "or another --gpus-per-node"
            )
    # The entrypoint must mean exactly the validated settings: parse it back and compare.
    again = spec.settings.from_cli(job.flags(), prog=spec.prog)
    again.storage.endpoint_url, again.storage.region = settings.storage.endpoint_url, settings.storage.region
    again.tracking.uri = settings.tracking.uri
    if again.model_dump() != settings.model_dump():
        raise ConfigError(f"internal: the entrypoint flags {job.flags()} do not reproduce the settings")
    return job


def _check_dataset(settings: Settings) -> None:
    url, size, channels = DIGITS
    data = settings.data
    if data.url == url and (data.image_size, data.channels) != (size, channels):
        raise ConfigError(
            f"--data.url: the default {url} holds {size}x{size} grayscale digits, but the job asks for "
            f"--data.image-size {data.image_size} --data.channels {data.channels}: point --data.url at your dataset"
        )


def settings_flags(settings: JobSettings) -> list[str]:
    """The flags that reproduce ``settings``: fields at their default are left out, except the worker
    group's, which a reader of the manifest should see."""
    defaults = type(settings).model_construct()
    flags: list[str] = []
    for section in type(settings).model_fields:
        value, default = getattr(settings, section), getattr(defaults, section)
        if not isinstance(value, BaseModel):  # a top-level field (jobs/sample.py's --run-id, --num-images, ...)
            if section == "dry_run" or (value == default and ("", section) not in ALWAYS_SHOWN):
                continue
            flags += _flag(f"--{section.replace('_', '-')}", value)
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


def entrypoint_kind(entrypoint: str) -> str | None:
    """``train`` or ``sample`` for an entrypoint of jobs/train.py or jobs/sample.py, else None."""
    argv = shlex.split(entrypoint)
    for kind, spec in KINDS.items():
        if argv[: len(spec.entrypoint)] == spec.entrypoint:
            return kind
    return None


def entrypoint_settings(entrypoint: str) -> JobSettings:
    """The settings an entrypoint's flags give the job (jobs/train.py or jobs/sample.py); ``ConfigError`` if
    invalid or carrying a secret."""
    kind = entrypoint_kind(entrypoint)
    if kind is None:
        raise ConfigError(
            f"{entrypoint!r} does not start with {shlex.join(ENTRYPOINT)!r} or {shlex.join(SAMPLE_ENTRYPOINT)!r}"
        )
    spec = KINDS[kind]
    settings = spec.settings.from_cli(shlex.split(entrypoint)[len(spec.entrypoint) :], prog=spec.prog)
    for (section, name), why in FORBIDDEN_FLAGS.items():
        if getattr(getattr(settings, section), name) is not None:
            raise ConfigError(f"--{section}.{name.replace('_', '-')}: {why}")
    return settings
