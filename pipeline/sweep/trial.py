"""One trial of a sweep, run by Ray Tune in a trial actor that holds no CPU: a whole training run
(``pipeline.train.launch``, its own Ray Train worker group) with the base settings plus the trial's
values, then the pipeline's sampling evaluation of it (``pipeline.sample.evaluate``).

The training run is named ``<sweep>-t<index>`` and is an ordinary run: its checkpoints are under
``storage.checkpoint_url``, its MLflow run (a child of the sweep's) is created as ``jobs/train.py``
creates one, and a trial that runs again (a resumed sweep) continues that run from its own last
checkpoint. Ray Tune sees the run's validation losses as they come (``ValidationReport``), so ASHA
can stop the trial, and one final result with the evaluation's figures.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from pipeline.config import SampleConfig
from pipeline.sample.evaluate import evaluate
from pipeline.sample.settings import SampleSettings
from pipeline.sweep.config import SweepSettings, trial_run_name
from pipeline.sweep.space import Space, trial_values, with_values
from pipeline.tracking import PARENT_TAG, TrackedRun, end_run
from pipeline.train import launch
from pipeline.train.failures import TrainingFailed

FD_KEY_RE = re.compile(r".*/fd_[a-z0-9]+")


class TrialFailed(RuntimeError):
    """The trial's training or evaluation failed; the message is the reason its MLflow run carries."""


@dataclass
class TrialJob:
    """What every trial gets (through Ray's object store, inside the cluster: it holds the secrets)."""

    settings: SweepSettings
    space: Space
    parent_run_id: str


def run_trial(config: dict[str, Any], job: TrialJob) -> None:
    """Ray Tune's trainable: ``config`` holds the trial's value of each path of the space."""
    from ray import tune

    from pipeline.sweep.report import ValidationReport

    t0 = time.time()
    sw = job.settings.sweep
    trial_id = tune.get_context().get_trial_id()
    name = trial_run_name(sw.name, trial_id)
    values = trial_values(config, job.space)
    settings = with_values(job.settings.base(), values)
    settings.train.run_name = name
    settings.train.resume = launch.run_exists(settings, name)
    run_id = launch.preflight(settings)
    if run_id is None:
        raise TrialFailed(f"no MLflow run for {name}: the tracking server {settings.tracking.uri} did not answer")
    TrackedRun(settings.tracking.uri, run_id).set_tags(
        {
            PARENT_TAG: job.parent_run_id,
            "sweep.name": sw.name,
            "sweep.trial": name.rsplit("-", 1)[-1],
            "sweep.trial_id": trial_id,
            "sweep.values": json.dumps(values),
            "sweep.status": "running",
        }
    )
    shown = ", ".join(f"{k}={v}" for k, v in values.items())
    print(f"[sweep] trial {name} ({shown}): {'resuming its run' if settings.train.resume else 'training'}", flush=True)
    try:
        launch.launch(settings, run_id, callbacks=[ValidationReport()])
    except TrainingFailed as e:  # fit() has ended the run FAILED, with the reason
        raise TrialFailed(str(e)) from None
    tune.report(evaluate_trial(settings, job, run_id) | {"wall_s": time.time() - t0})


def evaluate_trial(settings, job: TrialJob, run_id: str) -> dict[str, Any]:
    """The evaluation of a finished trial's run, into its MLflow run; returns the trial's final result."""
    import ray

    sw = job.settings.sweep
    n = sw.eval_images
    try:
        s = SampleSettings(
            run_id=run_id,
            num_images=n,
            batch_size=min(256, n),
            workers=sw.eval_workers,
            grid_size=min(64, n),
            progress=False,
            sample=SampleConfig(method=sw.eval_method, steps=sw.eval_steps),
            storage=settings.storage,
            tracking=settings.tracking,
            cluster=settings.cluster,
        )
        # In a task of its own: Tune starts the trial in a placement group that captures the trial's
        # children, and the sampling actors would have to fit in the trial's (CPU-less) bundle.
        task = ray.remote(_evaluate).options(
            num_cpus=0,
            scheduling_strategy="DEFAULT",
            runtime_env={"env_vars": {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}},
        )
        summary = ray.get(task.remote(s, settings.train.run_name))
        key = next(k for k in summary["metrics"] if FD_KEY_RE.fullmatch(k))
    except Exception as e:  # the run trained: it fails as a trial, with the evaluation's reason
        e = getattr(e, "cause", None) or e  # a RayTaskError carries the task's own exception
        reason = f"evaluation failed: {type(e).__name__}: {' '.join(str(e).split())}"
        end_run(settings.tracking.uri, run_id, "FAILED", reason)
        raise TrialFailed(reason) from None
    run = TrackedRun(settings.tracking.uri, run_id)
    val, seen = run.last_metric("val/loss"), run.last_metric("train/images_seen")
    return {
        "val_loss": val[1] if val else math.nan,
        "images_seen": int(seen[1]) if seen else settings.train.total_images,
        "fd": summary["metrics"][key],
        "fd_floor": summary["metrics"].get(f"{key}_floor", math.nan),
        "fd_metric": key,
        "evaluated": True,
    }


def _evaluate(s, run_name: str) -> dict[str, Any]:

    return evaluate(s, log=lambda line: print(f"[sweep] {run_name}: {line}", flush=True))
