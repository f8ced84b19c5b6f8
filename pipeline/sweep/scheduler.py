"""Ray Tune's side of a sweep, in the driver: ASHA on the trials' validation losses, and the callback
that records each trial's end in its MLflow run and carries ASHA's rungs across a resume.

``Asha`` is Ray Tune's ``AsyncHyperBandScheduler`` over images seen (one bracket), with its rungs below
``train.total_images`` so that a trial that trained its whole budget is never stopped before its
evaluation. It prints and keeps each decision (a trial at a rung, its loss, the rung's cutoff,
continued or stopped). Ray Tune saves no scheduler state with a sweep's state; ``SweepCallback``
saves ASHA's rungs in its own (callback state is saved and restored with the trials), so a resumed
sweep still compares its trials with those that reached a rung before the interruption.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from pipeline.sweep.config import trial_run_name
from pipeline.sweep.results import FAILED, FINISHED, STOPPED
from pipeline.tracking import (
    FAILURE_TAG,
    PARENT_TAG,
    SWEEP_TAG,
    TrackedRun,
    TrackingError,
    end_run,
    find_or_create_run,
    find_run,
)

TESTED = "ray 2.60 (pyproject.toml pins the minor version)"


class Asha(AsyncHyperBandScheduler):
    def __init__(self, metric: str, grace_images: int, total_images: int, reduction_factor: float) -> None:
        # max_t one below the budget: no rung at the budget itself, where a trial has finished training
        super().__init__(
            time_attr="images_seen",
            metric=metric,
            mode="min",
            max_t=total_images - 1,
            grace_period=grace_images,
            reduction_factor=reduction_factor,
            brackets=1,
            stop_last_trials=False,
        )
        if not (len(self._brackets) == 1 and isinstance(getattr(self._brackets[0], "_rungs", None), list)):
            raise RuntimeError(f"Ray Tune's ASHA keeps its rungs elsewhere now; {__name__} is written for {TESTED}")
        self.decisions: dict[str, list[dict[str, Any]]] = {}  # trial id -> its decisions, in order

    @property
    def rungs(self) -> list[tuple[float, dict[str, float]]]:
        """(milestone in images, {trial id: -loss}) of each rung, highest first (ASHA's own records)."""
        return self._brackets[0]._rungs

    def milestones(self) -> list[int]:
        return sorted(int(m) for m, _ in self.rungs)

    def _judged_at(self, trial_id: str, images: float) -> tuple[float, float | None] | None:
        """(milestone, cutoff loss) of the rung ASHA judges this result at, or None (as _Bracket.on_result)."""
        for milestone, recorded in self.rungs:
            if images >= milestone and trial_id in recorded:
                return None
            if images >= milestone:
                cutoff = self._brackets[0].cutoff(recorded)
                return milestone, None if cutoff is None else -float(cutoff)
        return None

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        judged = None
        if self._time_attr in result and self._metric in result:
            judged = self._judged_at(trial.trial_id, result[self._time_attr])
        action = super().on_trial_result(tune_controller, trial, result)
        if judged is not None:
            milestone, cutoff = judged
            value, stopped = float(result[self._metric]), action == TrialScheduler.STOP
            self.decisions.setdefault(trial.trial_id, []).append(
                {"rung": int(milestone), "images": int(result[self._time_attr]), "value": value, "cutoff": cutoff}
                | {"decision": "stopped" if stopped else "continued"}
            )
            versus = "first at this rung" if cutoff is None else f"cutoff {cutoff:.4g}"
            print(
                f"[sweep] ASHA: {trial.trial_id} at rung {int(milestone):,} images ({int(result[self._time_attr]):,} "
                f"seen): {self._metric} {value:.4g}, {versus}: {'stopped' if stopped else 'continues'}",
                flush=True,
            )
        return action

    def get_state(self) -> dict[str, Any]:
        return {"rungs": [[m, dict(r)] for m, r in self.rungs], "decisions": self.decisions}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = {float(m): r for m, r in state.get("rungs", [])}
        for milestone, recorded in self.rungs:
            recorded.update(saved.get(float(milestone), {}))
        self.decisions.update(state.get("decisions", {}))


class SweepCallback(Callback):
    """Marks each trial's MLflow run when the trial ends (finished, stopped early by ASHA, failed),
    keeps ASHA's rungs in the sweep's saved state, and holds every trial's row in ``rows`` when the
    sweep ends (``ran_callback`` finds the instance that ran)."""

    def __init__(self, uri: str, experiment: str, sweep: str, scheduler: Asha | None, paths: list[str]) -> None:
        self.uri, self.experiment, self.sweep = uri, experiment, sweep
        self.scheduler, self.paths = scheduler, paths
        self.rows: list[dict[str, Any]] = []

    # -- state saved with the sweep's ---------------------------------------------------------------------
    def get_state(self) -> dict | None:
        return {"asha": self.scheduler.get_state()} if self.scheduler else None

    def set_state(self, state: dict) -> None:
        if self.scheduler and "asha" in state:
            self.scheduler.set_state(state["asha"])

    # -- trials ----------------------------------------------------------------------------------------
    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        if trial.last_result.get("evaluated"):
            self._mark(trial, FINISHED)
            return
        seen = trial.last_result.get("images_seen")
        why = f"stopped early by ASHA at {int(seen):,} images" if seen is not None else "stopped before any result"
        self._mark(trial, STOPPED, end=("KILLED", why), extra={"sweep.stopped_at_images": seen})

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._mark(trial, FAILED, end=("FAILED", error_line(trial)))

    def on_experiment_end(self, trials: list, **info) -> None:
        self.rows = [self.row(t) for t in trials]

    def _mark(self, trial, status: str, *, end: tuple[str, str] | None = None, extra: dict | None = None) -> None:

        name = trial_run_name(self.sweep, trial.trial_id)
        print(f"[sweep] trial {name} {status}" + (f": {end[1]}" if end and status == FAILED else ""), flush=True)
        try:
            run_id = find_run(self.uri, self.experiment, name)
            if run_id is None:  # it failed before its run was made: make it, to hold the failure
                parent = find_run(self.uri, self.experiment, self.sweep, tag=SWEEP_TAG)
                run_id = find_or_create_run(
                    self.uri, self.experiment, name, tags={PARENT_TAG: parent} if parent else {}
                )
            run = TrackedRun(self.uri, run_id)
            decisions = self.scheduler.decisions.get(trial.trial_id, []) if self.scheduler else []
            rungs = "; ".join(
                f"{d['rung']:,}: {d['value']:.4g} vs {'-' if d['cutoff'] is None else format(d['cutoff'], '.4g')} "
                f"{d['decision']}"
                for d in decisions
            )
            run.set_tags(
                {"sweep.status": status, "sweep.name": self.sweep, "sweep.trial_id": trial.trial_id}
                | ({"sweep.rungs": rungs} if rungs else {})
                | {k: v for k, v in (extra or {}).items() if v is not None}
            )
            # A trial stopped by ASHA leaves its run RUNNING (its workers were killed); a failed one may
            # too, or be FAILED already with the training's own reason (kept).
            unexplained = status == FAILED and FAILURE_TAG not in run.tags
            if end and (run.status in ("RUNNING", "SCHEDULED") or unexplained):
                end_run(self.uri, run_id, *end)
        except TrackingError as e:
            print(f"WARNING: {e}", flush=True)

    def row(self, trial) -> dict[str, Any]:
        r = trial.last_result or {}
        if trial.status == "ERROR":
            status = FAILED
        elif r.get("evaluated"):
            status = FINISHED
        elif trial.status == "TERMINATED":
            status = STOPPED
        else:
            status = trial.status.lower()  # pending/running: the sweep was interrupted
        config = trial.config or {}
        return {
            "trial": trial_run_name(self.sweep, trial.trial_id).rsplit("-", 1)[-1],
            "trial_id": trial.trial_id,
            "run_name": trial_run_name(self.sweep, trial.trial_id),
            "status": status,
            "values": {p: _plain(config.get(p)) for p in self.paths},
            "images_seen": r.get("images_seen"),
            "val_loss": r.get("val_loss"),
            "fd": r.get("fd"),
            "fd_floor": r.get("fd_floor"),
            "fd_metric": r.get("fd_metric"),
            "wall_s": r.get("wall_s") or r.get("time_total_s"),
            "rungs": self.scheduler.decisions.get(trial.trial_id, []) if self.scheduler else [],
            "error": error_line(trial) if trial.status == "ERROR" else None,
        }


def ran_callback(tuner) -> SweepCallback:
    """The ``SweepCallback`` that ``tuner.fit()`` ran: the one given to a new Tuner, or for a restored
    sweep the one unpickled with its saved state (Tune runs that one, not a new one)."""
    found = [c for c in tuner._local_tuner.get_run_config().callbacks or [] if isinstance(c, SweepCallback)]
    if not found:
        raise RuntimeError("the sweep's Tuner ran without its SweepCallback: no trial results to record")
    return found[0]


def error_line(trial) -> str:
    """The last line of the trial's error (the exception Tune caught), or a placeholder."""
    text = ""
    try:  # the driver's own copy first: the one in storage is uploaded with the next state save
        if trial.error_file and Path(trial.error_file).is_file():
            text = Path(trial.error_file).read_text()
        else:
            text = trial.get_error() or ""
    except Exception:  # noqa: BLE001 - the error text is a convenience
        pass
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[-1][:2000] if lines else "the trial failed (no error text was saved)"


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v
