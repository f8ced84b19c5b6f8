"""The sweep job's settings: the training ``Settings`` (the base every trial starts from) plus ``sweep``."""

from __future__ import annotations

import re
import time
import uuid
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config import RUN_NAME_RULE, Section, Settings

SWEEP_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,89}")  # + "-t<index>" stays a valid run name


class SweepConfig(Section):
    """A hyper-parameter sweep (jobs/sweep.py): Ray Tune trials, each a training run plus its evaluation."""

    space: str | None = Field(
        None, description="search space: a YAML file, or the YAML mapping itself (format: docs/sweep.md)"
    )
    name: str | None = Field(
        None,
        description="sweep name: its state is <state_url>/<name>, its trials' runs <name>-t<index>, its MLflow "
        "parent run is tagged ddpm.sweep=<name>; required to resume; default: a new timestamped name",
    )
    resume: bool = Field(
        False, description="continue the sweep of this name: finished trials are kept, interrupted ones resume"
    )
    retry_failed: bool = Field(
        False, description="with --sweep.resume: run failed trials again (from their runs' checkpoints)"
    )
    num_samples: int = Field(
        1, ge=1, description="draws from the space's ranges and choices; each grid point is tried this many times"
    )
    seed: int = Field(0, description="seed of the draws from the space (the trials' own seed is train.seed)")
    max_concurrent: int = Field(
        1,
        ge=1,
        description="trials at a time; each takes cluster.num_workers workers (x cluster.threads_per_worker CPUs "
        "or one GPU each), so at most what the cluster holds",
    )
    stop_metric: Literal["val_loss", "none"] = Field(
        "val_loss",
        description="what ASHA stops bad trials on: the validation loss (lower is better; needs "
        "--train.validate-every-images), or none (every trial trains to train.total_images)",
    )
    grace_images: int = Field(
        50_000, ge=1, description="ASHA: images every trial trains before it can be stopped (its first rung)"
    )
    reduction_factor: float = Field(
        3.0,
        gt=1,
        description="ASHA: rungs at grace_images x reduction_factor^k images, below train.total_images; at a rung "
        "a trial continues only if it is in the best 1/reduction_factor of the trials that reached it",
    )
    rank_metric: Literal["fd", "val_loss"] = Field(
        "fd",
        description="what ranks the finished trials (lower is better): fd, the Frechet distance of the "
        "evaluation in the dataset's feature space (pipeline.sample.quality), or the last val_loss",
    )
    eval_images: int = Field(1000, ge=2, description="images each finished trial samples for its evaluation")
    eval_method: Literal["ancestral", "ddim"] = Field("ddim", description="the evaluation's sampler")
    eval_steps: int = Field(50, ge=1, description="the evaluation's DDIM steps (ancestral takes all T)")
    eval_workers: int | None = Field(
        None, ge=1, description="the evaluation's sampling actors; default: cluster.num_workers"
    )
    state_url: str | None = Field(
        None,
        description="where Ray Tune keeps sweep states (a sweep's is <state_url>/<name>); default: 'sweeps' beside "
        "storage.checkpoint_url (s3://ddpm-checkpoints/runs -> s3://ddpm-checkpoints/sweeps)",
    )
    state_every_s: float = Field(
        10.0,
        gt=0,
        description="seconds between saves of the sweep's state; a trial that ended after the last save runs "
        "again on resume (its run continues from its own checkpoint)",
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        if v is not None and not SWEEP_NAME_RE.fullmatch(v):
            raise ValueError(f"must match {SWEEP_NAME_RE.pattern}: {RUN_NAME_RULE}, at most 90")
        return v


class SweepSettings(Settings):
    """A sweep: every training setting (the base of every trial) plus the ``sweep`` section."""

    sweep: SweepConfig = SweepConfig()

    @model_validator(mode="after")
    def _sweep_fits_training(self) -> SweepSettings:
        sw, t = self.sweep, self.train
        if not sw.space:
            raise ValueError("sweep.space: give the search space (a YAML file or inline YAML; docs/sweep.md)")
        if sw.resume and not sw.name:
            raise ValueError("sweep.resume needs sweep.name: name the sweep to continue")
        if sw.retry_failed and not sw.resume:
            raise ValueError("sweep.retry_failed applies to a resumed sweep: add --sweep.resume")
        needs_validation = [x for x in (sw.stop_metric, sw.rank_metric) if x == "val_loss"]
        if needs_validation and not t.validate_every_images:
            raise ValueError(
                "sweep.stop_metric / sweep.rank_metric = val_loss needs the validation loss: pass "
                f"--train.validate-every-images N (at most --sweep.grace-images {sw.grace_images})"
            )
        if sw.stop_metric != "none":
            if sw.grace_images >= t.total_images:
                raise ValueError(
                    f"sweep.grace_images={sw.grace_images} must be below train.total_images={t.total_images} "
                    "(the per-trial budget): no trial could be stopped"
                )
            if t.validate_every_images > sw.grace_images:
                raise ValueError(
                    f"train.validate_every_images={t.validate_every_images} must be at most sweep.grace_images="
                    f"{sw.grace_images}: a trial must report its validation loss at the first rung"
                )
        if t.run_name or t.resume:
            raise ValueError("train.run_name / train.resume: the sweep names and resumes its trials' runs itself")
        return self

    def base(self) -> Settings:
        """The training settings every trial starts from (secrets kept)."""
        return Settings.model_validate(self.model_dump(mode="python", exclude={"sweep", "dry_run"}))


def name_sweep(settings: SweepSettings) -> None:
    """A new timestamped ``sweep.name`` when none is given."""
    if not settings.sweep.name:
        settings.sweep.name = time.strftime("sweep-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def trial_run_name(sweep: str, trial_id: str) -> str:
    """The training run of a Tune trial: ``<sweep>-t<index>`` (Tune's trial ids end in a 5-digit index)."""
    index = trial_id.rsplit("_", 1)[-1]
    return f"{sweep}-t{int(index)}" if index.isdigit() else f"{sweep}-{trial_id}"
