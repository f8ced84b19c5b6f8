"""The sampling job's settings: which run or model version, which seeds, how to sample, where results go."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from pipeline.checkpoint import images_of
from pipeline.config import (
    MODEL_URI_RE,
    ClusterConfig,
    JobSettings,
    SampleConfig,
    StorageConfig,
    TrackingConfig,
)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class SampleSettings(JobSettings):
    """Sample images from a training run's checkpoint and log them, their cost and their quality to its MLflow run."""

    run_id: str | None = Field(
        None, description="MLflow run id of the training run (its checkpoints and config are used); or --model"
    )
    model: str | None = Field(
        None,
        description="registered model version to evaluate, models:/NAME/VERSION or models:/NAME@ALIAS: its source "
        "run and checkpoint are used and the results land in that run; or --run-id",
    )
    promote: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-]{1,100}$",
        description="with --model: set this alias (e.g. champion) on the version if its Frechet distance is lower "
        "than the current holder's (same sampler; no holder: promote); the decision is in the summary",
    )
    image_size: int | None = Field(
        None, ge=1, description="refuse a checkpoint or model that makes images of another size (pixels)"
    )
    num_images: int = Field(1000, ge=1, description="images to generate (seeds first_seed .. first_seed+num_images-1)")
    batch_size: int = Field(
        256, ge=1, description="seeds per batch handed to an actor (results come back batch by batch)"
    )
    chunk: int = Field(
        64,
        ge=1,
        description="images per model call inside an actor, the last call padded: every call has this shape, so "
        "an image does not depend on the batch size (use a multiple of it as --batch-size; larger on GPUs)",
    )
    first_seed: int = Field(0, ge=0, description="seed of the first image; image i has seed first_seed + i")
    workers: int | None = Field(
        None, ge=1, description="sampling actors (one GPU each where there are GPUs); default: cluster.num_workers"
    )
    checkpoint: str = Field(
        "latest",
        description="'latest' or a checkpoint of the run: images_<N> (or just N) for checkpoints/images_<N>.pt",
    )
    ema: bool = Field(True, description="sample with the EMA weights (--no-ema: the raw weights)")
    quality: bool = Field(
        True, description="compute the Frechet distance to the run dataset's eval split (--no-quality: skip)"
    )
    name: str | None = Field(
        None, description="evaluation name (artifact folder eval/<name>/); default <sampler>-<checkpoint>-<UTC time>"
    )
    grid_size: int = Field(64, ge=1, le=1024, description="images (the first seeds) in the sample grid PNG")
    progress: bool = Field(True, description="progress bar (images done / total) on stderr")
    work_dir: str | None = Field(
        None, description="local folder for the outputs before upload (kept); default: a temporary folder (deleted)"
    )
    # An evaluation defaults to DDIM-50: 20x fewer model calls than the training grids' ancestral sampler.
    sample: SampleConfig = SampleConfig(method="ddim")
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    cluster: ClusterConfig = ClusterConfig()

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_name(cls, v: str) -> str:
        if v == "latest" or checkpoint_images(v) is not None:
            return v
        raise ValueError(f"expected 'latest', images_<N> or N, got {v!r}")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        if v is not None and not NAME_RE.match(v):
            raise ValueError("use letters, digits, '.', '_' and '-' (no '/'), starting with a letter or digit")
        return v

    @field_validator("first_seed")
    @classmethod
    def _seed_range(cls, v: int) -> int:
        if v >= 2**62:
            raise ValueError("must be below 2**62")
        return v

    @field_validator("model")
    @classmethod
    def _model_uri(cls, v: str | None) -> str | None:
        if v is not None and not MODEL_URI_RE.match(v):
            raise ValueError(f"expected models:/NAME/VERSION or models:/NAME@ALIAS, got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> SampleSettings:
        if (self.run_id is None) == (self.model is None):
            raise ValueError("run_id / model: give exactly one of --run-id RUN or --model models:/NAME/VERSION")
        if self.promote and not self.model:
            raise ValueError("promote: sets an alias of a registered model version; evaluate it with --model")
        if self.promote and not self.quality:
            raise ValueError("promote: the decision needs the quality metric; drop --no-quality")
        return self

    @model_validator(mode="after")
    def _enough_for_quality(self) -> SampleSettings:
        if self.quality and self.num_images < 2:
            raise ValueError("num_images: the Frechet distance needs at least 2 images (or pass --no-quality)")
        return self


def checkpoint_images(spec: str) -> int | None:
    """N of 'images_<N>', 'images_<N>.pt', 'checkpoints/images_<N>.pt' or 'N'; None otherwise."""
    return int(spec) if spec.isdigit() else images_of(spec)
