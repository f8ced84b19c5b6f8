"""The error every job maps to exit status 1.

``JobError`` is the base of the errors raised when something a job needs cannot be used: data or
storage (``pipeline.data.errors.DataError``), an MLflow run or model (``TrackingError``), the sampling
pool, a training run that failed. Each message names what and why, for the operator; the CLI
(``pipeline.cli``) prints it and exits 1. Settings that cannot work are ``ConfigError`` (exit 2).
"""

from __future__ import annotations


class JobError(RuntimeError):
    """Something the job needs cannot be used (a run, a checkpoint, data, the cluster); the message
    says which and why. Exit status 1."""
