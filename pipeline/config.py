"""Typed, nested configuration (pydantic-settings): one class per concern, every field documented.

Precedence, highest first: command-line flags (``--train.batch-size 64``), ``DDPM_``-prefixed
environment variables with ``__`` between levels (``DDPM_TRAIN__BATCH_SIZE=64``), the standard
variables of the services (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, ``MLFLOW_TRACKING_URI``, ``RAY_ADDRESS``), the same variables from the JSON
file that ``DDPM_ENV_FILE`` names (when set; e.g. the ``env.json`` a local stack writes), then defaults.

The maths, model and training step never import this module: they take plain dataclasses, so they
run where only torch is installed.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from pipeline.ddpm.sampler import SamplerOptions
from pipeline.ddpm.schedule import NoiseSchedule
from pipeline.ddpm.unet import PRESETS, UNetConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DiffusionConfig(Section):
    """Noise schedule and training objective (DDPM section 4)."""

    schedule: Literal["linear", "cosine"] = Field(
        "linear", description="beta schedule: linear (DDPM) or cosine (Nichol & Dhariwal)"
    )
    num_timesteps: int = Field(1000, ge=2, description="T, the number of diffusion steps")
    beta_start: float = Field(1e-4, gt=0, lt=1, description="beta_1 of the linear schedule")
    beta_end: float = Field(0.02, gt=0, lt=1, description="beta_T of the linear schedule")
    cosine_s: float = Field(0.008, ge=0, description="offset s of the cosine schedule")
    objective: Literal["eps", "x0", "v"] = Field(
        "eps", description="what the network predicts: eps (Algorithm 1), x0 or v"
    )

    @model_validator(mode="after")
    def _betas_rise(self) -> DiffusionConfig:
        if self.schedule == "linear" and self.beta_end <= self.beta_start:
            raise ValueError(
                f"diffusion.beta_end ({self.beta_end}) must be greater than diffusion.beta_start ({self.beta_start})"
            )
        return self

    def build(self) -> NoiseSchedule:
        return NoiseSchedule(self.schedule, self.num_timesteps, self.beta_start, self.beta_end, self.cosine_s)


class ModelConfig(Section):
    """The U-Net: a named preset, optionally with single fields overridden."""

    preset: str = Field("digits", description=f"architecture preset: one of {sorted(PRESETS)}")
    base_channels: int | None = Field(None, description="override: channels of the first level (multiple of 8)")
    channel_mult: tuple[int, ...] | None = Field(None, description="override: channel multiplier per resolution level")
    num_res_blocks: int | None = Field(None, description="override: residual blocks per level")
    attention_resolutions: tuple[int, ...] | None = Field(
        None, description="override: resolutions (pixels) with self-attention"
    )
    dropout: float | None = Field(None, description="override: dropout in residual blocks")
    attention: Literal["sdpa", "math"] = Field("sdpa", description="attention kernel: torch SDPA or explicit softmax")

    @model_validator(mode="after")
    def _known_preset(self) -> ModelConfig:
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset: unknown preset {self.preset!r}; known: {sorted(PRESETS)}")
        return self

    def resolve(self, image_size: int, in_channels: int) -> UNetConfig:
        fields = dict(PRESETS[self.preset])
        for k in ("base_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "dropout"):
            if getattr(self, k) is not None:
                fields[k] = getattr(self, k)
        return UNetConfig(**fields, image_size=image_size, in_channels=in_channels, attention=self.attention)


class DataConfig(Section):
    """Training images: WebDataset shards with a manifest, on S3 (s3://bucket/prefix) or a local folder."""

    url: str = Field("s3://ddpm-data/digits", description="dataset root holding train/ and eval/ shards and manifests")
    image_size: int = Field(8, ge=1, description="image height = width in pixels (checked against the manifest)")
    channels: int = Field(
        1, ge=1, le=4, description="image channels: 1 grayscale, 3 RGB (checked against the manifest)"
    )
    shuffle_buffer: int = Field(1000, ge=0, description="samples held in the shuffle buffer (0 disables shuffling)")
    hflip: bool = Field(False, description="random horizontal flips (off for digits: flips change their meaning)")
    loader_workers: Literal["auto"] | Annotated[int, Field(ge=0)] = Field(
        "auto",
        description="DataLoader worker processes per training process (0: read in the process itself); "
        "auto: 2 with a GPU, 0 on CPU, where the trainer already uses the cores it was given",
    )
    strict: bool = Field(False, description="fail at the first bad shard or sample instead of skipping and counting it")
    resize: Literal["center", "random", "never"] = Field(
        "center",
        description="images stored at another size than image_size: shorter side resized, then a center or random "
        "crop, in the loader (same-size data is not touched); never: refuse them",
    )
    label_key: str | None = Field(
        None,
        description="where a sample's class is: cls (its .cls member) or a field of its .json member (e.g. label); "
        "default: what the manifest says (cls for datasets written by prepare_data)",
    )
    partitions: int = Field(
        4,
        ge=1,
        description="canonical partitions of the data order, fixed for a run: the samples and global batches "
        "depend on them, not on the number of workers (at most this many workers; best a multiple of it)",
    )

    def workers_for(self, device: str) -> int:
        """The number of DataLoader workers on ``device`` ("cuda" or "cpu")."""
        if self.loader_workers != "auto":
            return self.loader_workers
        # On CPU a loader process competes with the training step for the same cores: with 2 workers
        # on 2 cores, reading in-process trained at 731 img/s vs 652 with one loader each (docs/data.md).
        return 2 if device == "cuda" else 0


RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
RUN_NAME_RULE = "1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit"
# A registered model version: models:/NAME/VERSION or models:/NAME@ALIAS (MLflow's own forms).
MODEL_URI_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))$")


class TrainConfig(Section):
    """Optimisation, checkpointing and evaluation of one training run. Counts are in images seen."""

    run_name: str | None = Field(
        None,
        description="run name (letters, digits, '.', '_', '-'; at most 100; not starting with '.', '_' or '-'); "
        "required to resume; default: a new timestamped name",
    )
    resume: bool = Field(False, description="continue the existing run of this name (a new name never resumes)")
    total_images: int = Field(200_000, ge=1, description="train until this many images have been seen")
    batch_size: int = Field(128, ge=1, description="global batch per optimizer step, over all workers")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    lr: float = Field(2e-4, gt=0, description="peak AdamW learning rate (DDPM: 2e-4)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_images: int = Field(10_000, ge=0, description="linear learning-rate warm-up length")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="after the warm-up: constant, or a half cosine to min_lr_ratio * lr at total_images"
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine schedule: the final learning rate / lr")
    loss_weighting: Literal["uniform", "min_snr"] = Field(
        "uniform", description="per-timestep loss weights: uniform (DDPM L_simple) or min_snr (Min-SNR-gamma)"
    )
    min_snr_gamma: float = Field(5.0, gt=0, description="min_snr weighting: the SNR cap gamma (Hang et al.: 5)")
    validate_every_images: int = Field(
        0, ge=0, description="validation loss (EMA model, fixed eval images and noise) every this many images; 0: off"
    )
    validate_images: int = Field(256, ge=1, description="eval-split images in the validation loss")
    grad_clip: float = Field(1.0, gt=0, description="clip the global gradient norm to this")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA decay of the weights (DDPM: 0.9999 on long runs)")
    ema_warmup: bool = Field(True, description="EMA decay min(decay, (1+n)/(10+n)) over optimizer steps n")
    seed: int = Field(0, description="seed of weights, timesteps, noise and data order")
    checkpoint_every_images: int = Field(50_000, ge=1, description="save a checkpoint every this many images")
    keep_checkpoints: int = Field(2, ge=2, description="checkpoints kept in storage (at least the last two)")
    sample_every_images: int = Field(
        100_000, ge=0, description="log an EMA sample grid every this many images (0: only at the end)"
    )
    grid_size: int = Field(64, ge=1, description="images in a sample grid (fixed seeds 0..n-1)")
    log_every_steps: int = Field(10, ge=1, description="optimizer steps between metric logs")
    progress_every_s: float = Field(
        15.0, gt=0, description="seconds between the progress lines rank 0 prints (images, loss, images/s, ETA)"
    )
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 autocast (GPU only; very slow on CPUs)")
    channels_last: bool = Field(False, description="channels_last memory format (helps convolutions on GPU)")
    compile: bool = Field(False, description="torch.compile the model (slower on CPU; helps on GPU)")
    compile_mode: str = Field("default", description="torch.compile mode: default, reduce-overhead, max-autotune")
    fused_adamw: bool = Field(False, description="fused AdamW kernel (CUDA)")
    max_bad_steps: int = Field(
        3, ge=1, description="non-finite losses in a row before rolling back to the last checkpoint"
    )
    register_as: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="registered MLflow model that a finished run adds a version to; "
        "default ddpm-<last part of data.url>",
    )

    @field_validator("run_name")
    @classmethod
    def _safe_run_name(cls, v: str | None) -> str | None:
        # The name becomes a storage path and an MLflow tag: '/' would nest runs, '..' escape the root.
        if v is not None and not RUN_NAME_RE.fullmatch(v):
            raise ValueError(f"must match {RUN_NAME_RE.pattern}: {RUN_NAME_RULE}")
        return v

    @model_validator(mode="after")
    def _resume_needs_name(self) -> TrainConfig:
        if self.resume and not self.run_name:
            raise ValueError("train.resume needs train.run_name: name the run to continue")
        return self

    @model_validator(mode="after")
    def _cosine_after_warmup(self) -> TrainConfig:
        if self.lr_schedule == "cosine" and self.total_images <= self.warmup_images:
            raise ValueError(
                f"train.lr_schedule=cosine needs train.total_images ({self.total_images}) > "
                f"train.warmup_images ({self.warmup_images}): the cosine runs between them"
            )
        return self


class SampleConfig(Section):
    """Reverse-process sampling (Algorithm 2 or DDIM); default ancestral in training grids, ddim in jobs/sample.py."""

    method: Literal["ancestral", "ddim"] = Field("ancestral", description="ancestral (Algorithm 2, T steps) or ddim")
    steps: int = Field(50, ge=1, description="DDIM: number of respaced steps, at most T (ancestral takes all T)")
    eta: float = Field(0.0, ge=0, description="DDIM: 0 deterministic, 1 ancestral-like")
    variance: Literal["fixed_small", "fixed_large"] = Field(
        "fixed_small", description="ancestral: sigma_t^2 = beta-tilde_t (fixed_small) or beta_t (fixed_large)"
    )
    clip: bool = Field(True, description="clip the predicted x0 to [-1, 1] and use the posterior mean")

    def options(self, objective: str) -> SamplerOptions:
        """The sampler's own (torch-only) options, for a model trained with ``objective``."""
        steps = self.steps if self.method == "ddim" else None
        return SamplerOptions(self.method, steps, self.eta, self.variance, self.clip, objective)


class StorageConfig(Section):
    """S3-compatible object storage for shards and checkpoints."""

    endpoint_url: str | None = Field(None, description="S3 endpoint (env AWS_ENDPOINT_URL); None: AWS")
    access_key_id: str | None = Field(None, description="S3 access key (env AWS_ACCESS_KEY_ID)")
    secret_access_key: SecretStr | None = Field(None, description="S3 secret key (env AWS_SECRET_ACCESS_KEY)")
    region: str = Field("us-east-1", description="S3 region (env AWS_DEFAULT_REGION)")
    checkpoint_url: str = Field("s3://ddpm-checkpoints/runs", description="where Ray Train keeps run checkpoints")
    outage_s: float = Field(
        180.0,
        ge=0,
        description="seconds storage I/O (shards, checkpoints, listing, retention) retries through an S3 outage, "
        "with backoff, before the run fails (resume it with --train.resume)",
    )

    @classmethod
    def from_env(cls, env: dict[str, str], **overrides) -> StorageConfig:
        """From the services' standard variables (e.g. the local stack's env.json)."""
        return cls(
            endpoint_url=env.get("AWS_ENDPOINT_URL"),
            access_key_id=env.get("AWS_ACCESS_KEY_ID"),
            secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
            region=env.get("AWS_DEFAULT_REGION") or "us-east-1",
            **overrides,
        )

    def boto3_kwargs(self) -> dict[str, Any]:
        return {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key.get_secret_value() if self.secret_access_key else None,
            "region_name": self.region,
        }


class TrackingConfig(Section):
    """MLflow tracking."""

    uri: str | None = Field(None, description="MLflow tracking URI (env MLFLOW_TRACKING_URI); None disables tracking")
    experiment: str = Field("ddpm", description="MLflow experiment name")


class ClusterConfig(Section):
    """The Ray cluster and the worker group."""

    address: str | None = Field(None, description="Ray address (env RAY_ADDRESS); None: the current/local cluster")
    num_workers: int | str = Field(
        2,
        description="training workers (one GPU each where GPUs exist); a range MIN-MAX (e.g. 1-4) makes the "
        "group elastic: it trains on what the cluster gives and grows back when capacity returns",
    )
    use_gpu: Literal["auto", "yes", "no"] = Field(
        "auto",
        description="GPU workers: auto uses them if the cluster has a GPU per worker "
        "(some GPUs but fewer than workers is refused, naming the fix)",
    )
    threads_per_worker: int = Field(1, ge=1, description="torch threads per CPU worker")
    max_failures: int = Field(
        2, ge=0, description="worker-group restarts after a failure (resuming from the last checkpoint)"
    )
    socket_ifname: str | None = Field(
        None,
        description="network interface DDP uses between hosts (GLOO_/NCCL_SOCKET_IFNAME on every worker, e.g. eth0); "
        "None: the library's choice (the hostname's address)",
    )
    resize_interval_s: float = Field(
        60.0, gt=0, description="elastic group: seconds between Ray Train's checks for capacity to grow into"
    )
    worker_start_timeout_s: float | None = Field(
        None,
        gt=0,
        description="seconds Ray Train waits for a worker group to start before it retries with what is ready "
        "(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S; None: Ray's 60). A lost host can stay listed as alive "
        "for a while, and an elastic group first waits this long for it",
    )

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers_or_range(cls, v: Any) -> int | str:
        return workers_range(v)[1] if workers_range(v)[0] == workers_range(v)[1] else v

    @property
    def min_workers(self) -> int:
        return workers_range(self.num_workers)[0]

    @property
    def max_workers(self) -> int:
        return workers_range(self.num_workers)[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers


def workers_range(v: Any) -> tuple[int, int]:
    """(min, max) of a worker count (``4``, ``"4"``) or range (``"1-4"``); ValueError naming the problem."""
    text = str(v).strip()
    lo, sep, hi = text.partition("-")
    try:
        pair = (int(lo), int(hi)) if sep else (int(text), int(text))
    except ValueError:
        raise ValueError(f"cluster.num_workers={v!r}: expected a count (2) or a range MIN-MAX (1-4)") from None
    if not 1 <= pair[0] <= pair[1]:
        raise ValueError(f"cluster.num_workers={v!r}: need 1 <= MIN <= MAX")
    return pair


ENV_FILE_VAR = "DDPM_ENV_FILE"
MLFLOW_LOGIN = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def export_mlflow_login(tracking_uri: str | None) -> None:
    """MLflow's client reads its login from the process environment only: export the $DDPM_ENV_FILE's
    login, as a pair, when its MLflow server is the one used and no login is exported already."""
    from_file = env_file()
    if not tracking_uri or tracking_uri != from_file.get("MLFLOW_TRACKING_URI"):
        return
    if not any(os.environ.get(v) for v in MLFLOW_LOGIN) and all(from_file.get(v) for v in MLFLOW_LOGIN):
        os.environ.update({v: from_file[v] for v in MLFLOW_LOGIN})


def env_file() -> dict[str, str]:
    """The variables in the JSON object file that $DDPM_ENV_FILE names; {} when it is unset. They
    count as if exported, below the real environment: services' settings without a shell ``export``."""
    path = os.environ.get(ENV_FILE_VAR)
    if not path:
        return {}
    try:
        values = json.loads(Path(path).expanduser().read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SettingsError(f"cannot read {ENV_FILE_VAR}={path}: {e}") from e
    if not isinstance(values, dict):
        raise SettingsError(f"{ENV_FILE_VAR}={path} must hold a JSON object of variables")
    return {str(k): str(v) for k, v in values.items()}


class ServiceEnvSource(PydanticBaseSettingsSource):
    """The services' standard variables (the environment over ``env_file()``), mapped onto our fields."""

    MAPPING = {
        "AWS_ENDPOINT_URL": ("storage", "endpoint_url"),
        "AWS_ACCESS_KEY_ID": ("storage", "access_key_id"),
        "AWS_SECRET_ACCESS_KEY": ("storage", "secret_access_key"),
        "AWS_DEFAULT_REGION": ("storage", "region"),
        "MLFLOW_TRACKING_URI": ("tracking", "uri"),
        "RAY_ADDRESS": ("cluster", "address"),
    }

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values = env_file() | {k: v for k, v in os.environ.items() if k in self.MAPPING}
        out: dict[str, dict[str, str]] = {}
        for var, (section, name) in self.MAPPING.items():
            if values.get(var) and section in self.settings_cls.model_fields:
                out.setdefault(section, {})[name] = values[var]
        return out


class JobSettings(BaseSettings):
    """Base of every job's settings: env/CLI parsing, validation messages, printing."""

    model_config = SettingsConfigDict(
        env_prefix="DDPM_",
        env_nested_delimiter="__",
        extra="forbid",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_use_class_docs_for_groups=True,
        cli_exit_on_error=False,
        nested_model_default_partial_update=True,
    )

    dry_run: bool = Field(False, description="print the resolved configuration and exit")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return (init_settings, env_settings, ServiceEnvSource(settings_cls))

    @classmethod
    def from_cli(cls, argv: list[str] | None = None, prog: str | None = None):
        """Parse flags + environment. Invalid values raise ``ConfigError`` naming every bad field."""
        argv = sys.argv[1:] if argv is None else argv
        try:
            settings = cls(_cli_parse_args=argv, _cli_prog_name=prog or Path(sys.argv[0]).name)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e)) from None
        except SettingsError as e:
            raise ConfigError(f"configuration error: {e}") from None
        if (tracking := getattr(settings, "tracking", None)) is not None:
            export_mlflow_login(tracking.uri)
        return settings

    def to_public_dict(self) -> dict[str, Any]:
        """The resolved config as JSON-able data, secrets masked (SecretStr dumps as '**********')."""
        return json.loads(self.model_dump_json())

    def flat_params(self) -> dict[str, str]:
        """section.field -> value, for MLflow params."""
        out: dict[str, str] = {}

        def walk(prefix: str, d: Any) -> None:
            if isinstance(d, dict):
                for k, v in d.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = json.dumps(d) if isinstance(d, list | tuple) else str(d)

        walk("", self.to_public_dict())
        return out

    def dump(self) -> str:
        return json.dumps(self.to_public_dict(), indent=2)


class ConfigError(ValueError):
    """A configuration problem, with a message meant for the user."""


def format_validation_error(e: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(settings)"
        msg = err["msg"].removeprefix("Value error, ")
        given = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        lines.append(f"  {loc}: {msg}{given}")
    return "\n".join(lines)


class Settings(JobSettings):
    """Everything a training run needs; also the base for the other jobs."""

    diffusion: DiffusionConfig = DiffusionConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _model_fits_data(self) -> Settings:
        try:
            self.unet_config()
        except ValueError as e:
            raise ValueError(
                f"model preset {self.model.preset!r} at data.image_size={self.data.image_size}, "
                f"data.channels={self.data.channels}: {e}"
            ) from None
        most = self.cluster.max_workers
        if self.train.batch_size % (most * self.train.grad_accum):
            raise ValueError(
                f"train.batch_size={self.train.batch_size} must be divisible by the most cluster.num_workers="
                f"{most} x train.grad_accum={self.train.grad_accum}"
            )
        if most > self.data.partitions:
            raise ValueError(
                f"cluster.num_workers={self.cluster.num_workers}: at most data.partitions={self.data.partitions} "
                f"workers can share the data order; pass --data.partitions {most} (or a multiple of it)"
            )
        return self

    def unet_config(self) -> UNetConfig:
        return self.model.resolve(self.data.image_size, self.data.channels)


def reference_markdown(cls: type[JobSettings] = Settings) -> str:
    """The configuration reference, generated from the settings classes (README section)."""
    lines = []
    for section, info in cls.model_fields.items():
        model = info.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        lines += [
            f"**`{section}`** — {(model.__doc__ or '').strip()}",
            "",
            "| flag | env | default | meaning |",
            "|---|---|---|---|",
        ]
        for name, f in model.model_fields.items():
            flag = f"--{section}.{name.replace('_', '-')}"
            env = f"DDPM_{section.upper()}__{name.upper()}"
            default = json.dumps(f.default) if not isinstance(f.default, SecretStr) else "null"
            lines.append(f"| `{flag}` | `{env}` | `{default}` | {f.description or ''} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


README_MARKERS = ("<!-- config-reference:start", "<!-- config-reference:end -->")


def readme_with_reference(text: str) -> str:
    """README text with the generated configuration reference between its markers."""
    start, end = README_MARKERS
    i, j = text.index(start), text.index(end)
    i = text.index("\n", i) + 1
    return text[:i] + "\n" + reference_markdown() + "\n" + text[j:]


if __name__ == "__main__":  # python -m pipeline.config [--markdown | --update-readme]
    if "--update-readme" in sys.argv:
        readme = REPO_ROOT / "README.md"
        readme.write_text(readme_with_reference(readme.read_text()))
    else:
        print(reference_markdown())
