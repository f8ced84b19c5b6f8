"""Which training failures a restart can cure (``pipeline.train.policy`` acts on it in Ray Train).

A worker group restart (``cluster.max_failures``) helps when a process or node died, or storage was
away for longer than ``storage.outage_s``. It cannot help when the data is bad in strict mode, the
configuration contradicts the data or the run, or no checkpoint of the run can be loaded: each restart
would fail the same way. Those fail the run at once, with the worker's own message.
"""

from __future__ import annotations

from pipeline.config import ConfigError
from pipeline.data.errors import ShardError
from pipeline.errors import JobError


class NotRetryable(RuntimeError):
    """A failure that a restart from the last checkpoint would only repeat."""


class TrainingFailed(JobError):
    """The training run failed for good (its MLflow run is marked FAILED with the reason)."""


PERMANENT = (NotRetryable, ShardError, ConfigError)


def permanent_cause(error: BaseException | None) -> BaseException | None:
    """The first error in ``error``'s cause/context chain that no restart cures, or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, PERMANENT):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def failure_reason(error: BaseException) -> str:
    """One line for the operator and the MLflow run: the workers' own message where there is one."""
    workers = getattr(error, "worker_failures", None) or {}  # Ray Train's WorkerGroupError
    for e in workers.values():
        if cause := permanent_cause(e):
            return _line(cause)
    if workers:
        return _line(next(iter(workers.values())))
    if (inner := getattr(error, "controller_failure", None)) is not None:  # Ray Train's ControllerError
        return _line(inner)
    return _line(error)


def _line(error: BaseException) -> str:
    text = str(error).strip()
    if "Traceback" in text:  # a worker's formatted traceback ends with the exception line itself
        text = text.splitlines()[-1]
    return f"{type(error).__name__}: {' '.join(text.split())}"
