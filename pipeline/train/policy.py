"""Ray Train's failure policy for training runs: ``pipeline.train.failures`` decides what is permanent."""

from __future__ import annotations

import inspect
import signal
import threading

import ray
from ray.train.torch import TorchTrainer
from ray.train.v2.api.exceptions import ControllerError, TrainingFailedError, WorkerGroupError

from pipeline.tracking import end_run
from pipeline.train.failures import TrainingFailed, failure_reason, permanent_cause

TESTED = "ray 2.60 (pyproject.toml pins the minor version)"
try:  # Ray Train's failure policies are internal: a Ray that moved them is refused by name
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2._internal.execution.controller.controller import TrainController
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
except ImportError as e:
    raise ImportError(
        f"ray {ray.__version__}: Ray Train's failure-policy internals moved ({e}); {__name__} is written for {TESTED}"
    ) from e


class Policy(DefaultFailurePolicy):
    """Ray Train's default policy, except: permanent worker errors fail the run at once, and a worker
    group that cannot start yet (the cluster lacks the CPUs/GPUs) is reported as waiting and retried."""

    def __init__(self, failure_config, waiting_for: str = "the worker group") -> None:
        super().__init__(failure_config)
        self.waiting_for = waiting_for
        self.waited = 0

    def make_decision(self, training_failed_error: TrainingFailedError) -> FailureDecision:
        e = training_failed_error
        if isinstance(e, WorkerGroupError) and any(permanent_cause(w) for w in e.worker_failures.values()):
            print(f"[train] not retried (a restart would fail the same way): {failure_reason(e)}", flush=True)
            return FailureDecision.RAISE
        if isinstance(e, ControllerError) and isinstance(e.controller_failure, WorkerGroupStartupTimeoutError):
            self.waited += 1
            print(
                f"[train] still waiting for resources for {self.waiting_for} (startup attempt {self.waited}); "
                "the job starts when the cluster has them",
                flush=True,
            )
            return FailureDecision.RETRY
        return super().make_decision(e)


def check_ray_api() -> None:
    """Refuse a Ray where ``Trainer`` could not put its policy in place: Ray Train builds its default
    policy inside ``fit()`` and hands it to the controller through a private method, with no public
    setting for another one; an override that is never called would silently restore Ray's policy."""
    hands_over = callable(getattr(TorchTrainer, "_initialize_and_run_controller", None))
    if not (hands_over and "failure_policy" in inspect.signature(TrainController.__init__).parameters):
        raise RuntimeError(
            f"ray {ray.__version__}: Ray Train no longer hands its failure policy to the controller through "
            f"TorchTrainer._initialize_and_run_controller(failure_policy=...); {__name__} is written for {TESTED}"
        )


class Trainer(TorchTrainer):
    """Ray Train's TorchTrainer with ``Policy`` (see ``check_ray_api``)."""

    waiting_for = "the worker group"

    def __init__(self, *args, **kwargs) -> None:
        check_ray_api()
        super().__init__(*args, **kwargs)

    def _initialize_and_run_controller(self, **kwargs):
        if "failure_policy" not in kwargs:
            raise RuntimeError(f"ray {ray.__version__}: fit() passed no failure_policy to the controller; {TESTED}")
        kwargs["failure_policy"] = Policy(self.run_config.failure_config, self.waiting_for)
        return super()._initialize_and_run_controller(**kwargs)


def fit(trainer: Trainer, tracking_uri: str | None, mlflow_run_id: str | None):
    """``trainer.fit()``; a failed run ends its MLflow run FAILED (an interrupt or SIGTERM: KILLED) with
    the reason as a tag, and raises ``TrainingFailed`` with that one line."""

    def end(status: str, reason: str) -> None:
        if tracking_uri and mlflow_run_id:
            end_run(tracking_uri, mlflow_run_id, status, reason)

    def terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = (
        signal.signal(signal.SIGTERM, terminate) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        return trainer.fit()
    except TrainingFailedError as e:
        reason = failure_reason(e)
        end("FAILED", reason)
        raise TrainingFailed(f"training failed: {reason}") from e
    except KeyboardInterrupt as e:
        end("KILLED", f"interrupted ({e or 'SIGINT'})")
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
