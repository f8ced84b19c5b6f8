"""The sweep's driver (``jobs/sweep.py``): check everything before any trial, start or resume Ray Tune,
then rank the trials and mark the best in MLflow.

Before any trial: the space (every value a trial can take, ``pipeline.sweep.space``), the data and the
cluster (as a training run checks them), the sweep's name against its saved state (a name is never
silently reused: ``--sweep.resume`` continues it), and the MLflow parent run (found again by the
``ddpm.sweep`` tag; a resumed sweep must have the same space and training settings, which the parent
holds as params).

The sweep's state (Ray Tune's experiment) lives under ``sweep.state_url``/<name> in the run storage.
Tune writes it pickled, filesystem included, so the filesystem it gets carries no keys: Tune's storage
access in this process uses the AWS credential chain (the keys are exported to this process's
environment), and the trials themselves never touch it (no Tune checkpoints, no artifact sync).
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError
from pipeline.data.manifest import check_matches, open_manifest
from pipeline.data.storage import filesystem
from pipeline.errors import JobError
from pipeline.sweep.config import SweepSettings, name_sweep
from pipeline.sweep.results import FAILED, FINISHED, STOPPED, best_row, results_csv, summary_table
from pipeline.sweep.space import Space, load_space
from pipeline.tracking import NOTE_TAG, SWEEP_TAG, TrackedRun, TrackingError, end_run, find_or_create_run, find_run
from pipeline.train.launch import connect_and_choose_device, run_page

TRIAL_DRIVER_MEMORY = 256 * 2**20  # bytes
RESULTS_ARTIFACT = "sweep_results"  # .json (everything) and .csv (the table) on the parent run
# Params that may differ when a sweep is resumed: where and how it runs, not what its trials train.
RESUME_MAY_CHANGE = ("dry_run", "sweep.resume", "sweep.retry_failed", "sweep.space")
RESUME_MAY_CHANGE_PREFIXES = ("storage.", "tracking.", "cluster.address", "sweep.state_every_s")


class SweepError(JobError):
    """The sweep was interrupted, no trial finished, or its MLflow parent run cannot be reached."""


@dataclass
class Prepared:
    space: Space
    parent_run_id: str
    state_fs: Any  # pyarrow filesystem without keys
    state_root: str  # path of sweep.state_url in it
    resume: bool

    def state_path(self, name: str) -> str:
        return f"{self.state_root}/{name}"


def state_url(s: SweepSettings) -> str:
    """``sweep.state_url``, or a folder ``sweeps`` beside ``storage.checkpoint_url``."""
    if s.sweep.state_url:
        return s.sweep.state_url.rstrip("/")
    url = s.storage.checkpoint_url.rstrip("/")
    scheme, sep, rest = url.partition("://")
    if not sep:
        return posixpath.join(posixpath.dirname(url) or ".", "sweeps")
    head, slash, _ = rest.partition("/")
    parent = posixpath.dirname(rest) if slash else head
    return f"{scheme}://{parent}/sweeps"


def resolve(s: SweepSettings) -> None:
    """A name, and the space checked before anything else (``--dry-run`` prints it)."""
    name_sweep(s)
    space = load_space(s.sweep.space, s.base())
    if s.dry_run:
        n = space.grid_size() * s.sweep.num_samples
        print(f"search space ({n} trial(s) of {s.train.total_images:,} images at most):\n{space.describe()}")


def preflight(s: SweepSettings) -> Prepared:
    """Everything that must hold before a trial starts; ``ConfigError`` naming the problem otherwise."""
    from ray.tune import Tuner

    sw, name = s.sweep, s.sweep.name
    if not s.tracking.uri:
        raise ConfigError(
            "invalid configuration:\n  tracking.uri: a sweep records its trials in MLflow: set MLFLOW_TRACKING_URI "
            "or --tracking.uri (or start the local stack)"
        )
    base = s.base()
    space = load_space(sw.space, base)
    try:
        manifest = open_manifest(base.data.url, base.storage, "train")
        check_matches(manifest, image_size=base.data.image_size, channels=base.data.channels, resize=base.data.resize)
    except Exception as e:  # the data layer's errors name the URL and the cause
        raise ConfigError(f"error: {e}") from e
    export_keys(s)
    url = state_url(s)
    fs, root = filesystem(url, s.storage, keys=False)
    try:
        exists = Tuner.can_restore(f"{root}/{name}", storage_filesystem=fs)
    except Exception as e:
        raise ConfigError(f"error: cannot read the sweep state under {url}: {e}") from e
    check_name(name, url, exists=exists, resume=sw.resume)
    connect_and_choose_device(base)
    try:
        parent = find_or_create_run(
            s.tracking.uri, s.tracking.experiment, name, tag=SWEEP_TAG, tags={"sweep.state": f"{url}/{name}"}
        )
        run = TrackedRun(s.tracking.uri, parent)
        changed = run.log_new_params(sweep_params(s, space))
    except TrackingError:
        raise
    except Exception as e:
        raise SweepError(f"cannot reach the MLflow tracking server {s.tracking.uri}: {e}") from None
    changed = changed_params(changed)
    if changed:
        lines = "\n".join(f"  {k}: the sweep has {old!r}, now {new!r}" for k, (old, new) in sorted(changed.items()))
        raise ConfigError(
            f"invalid configuration: sweep {name!r} (MLflow run {parent}) was started with other settings; "
            f"resume it with the same space and training flags:\n{lines}"
        )
    return Prepared(space, parent, fs, root, exists)


def check_name(name: str, url: str, *, exists: bool, resume: bool) -> None:
    """A sweep's name is never silently reused: ``--sweep.resume`` continues it, and only it."""
    if exists and not resume:
        raise ConfigError(
            f"error: a sweep named {name!r} already exists under {url}; pass --sweep.resume to continue it, "
            "or choose another --sweep.name"
        )
    if resume and not exists:
        raise ConfigError(f"error: --sweep.resume: no sweep named {name!r} under {url}")


def changed_params(held: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """Of the parent run's params that differ from this job's, those a resume may not change."""
    return {k: v for k, v in held.items() if not _may_change(k)}


def _may_change(param: str) -> bool:
    return param in RESUME_MAY_CHANGE or param.startswith(RESUME_MAY_CHANGE_PREFIXES)


def sweep_params(s: SweepSettings, space: Space) -> dict[str, str]:
    """The parent run's params: the job's settings (the base of every trial) and the space."""
    return s.flat_params() | {f"space.{path}": json.dumps(spec) for path, spec in space.to_json().items()}


def export_keys(s: SweepSettings) -> None:
    """The S3 keys into this process's environment, where the keyless state filesystem finds them."""
    st = s.storage
    if st.access_key_id:
        os.environ["AWS_ACCESS_KEY_ID"] = st.access_key_id
    if st.secret_access_key:
        os.environ["AWS_SECRET_ACCESS_KEY"] = st.secret_access_key.get_secret_value()


# ------------------------------------------------------------------------------------------------
# The sweep


def run_sweep(s: SweepSettings, prep: Prepared) -> int:
    from ray import tune

    from pipeline.sweep.scheduler import ran_callback
    from pipeline.sweep.trial import TrialJob, run_trial

    sw, name, uri = s.sweep, s.sweep.name, s.tracking.uri
    # Read by Tune's controller when it is made: the period of the state saves that resumption starts from.
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = str(sw.state_every_s)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, job=TrialJob(s, prep.space, prep.parent_run_id)),
        # A trial only drives its Ray Train run: no CPU, so the run's workers get them all. Tune needs some
        # resource in the request: the memory the driver process holds (Ray, torch, the pipeline imported).
        {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY},
    )
    parent = TrackedRun(uri, prep.parent_run_id)
    parent.set_status("RUNNING")
    tuner = _tuner(s, prep, trainable)
    t0 = time.time()
    with _sigterm_as_sigint() as interrupted:
        tuner.fit()
    rows = getattr(ran_callback(tuner), "rows", [])  # a callback saved before it had rows: none recorded
    if interrupted.is_set() or any(r["status"] not in (FINISHED, STOPPED, FAILED) for r in rows):
        reason = f"interrupted; continue it with --sweep.resume --sweep.name {name}"
        end_run(uri, prep.parent_run_id, "KILLED", reason)
        raise SweepError(f"sweep {name!r} {reason}")
    best = record_results(s, prep, rows, time.time() - t0)
    print("\n" + summary_table(rows, s.sweep.rank_metric))
    page = run_page(s, prep.parent_run_id)
    if best is None:
        end_run(uri, prep.parent_run_id, "FAILED", f"no trial finished with a {sw.rank_metric}")
        raise SweepError(f"sweep {name!r}: no trial finished with a {sw.rank_metric}; MLflow parent run: {page}")
    parent.set_status("FINISHED")
    flags = " ".join(f"--{p.replace('_', '-')} {_flag_value(v)}" for p, v in best["values"].items())
    print(f"\nbest trial: {best['run_name']} ({sw.rank_metric} {best[sw.rank_metric]:.4g}); its settings: {flags}")
    print(f"MLflow parent run: {page}")
    print(f"SWEEP_RUN_ID={prep.parent_run_id}")
    print(f"SWEEP_NAME={name}")
    return 0


def _tuner(s: SweepSettings, prep: Prepared, trainable):
    """A new Tuner for the sweep, or the interrupted one restored from its saved state."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipeline.sweep.scheduler import Asha, SweepCallback
    from pipeline.sweep.space import to_tune

    sw, name = s.sweep, s.sweep.name
    if prep.resume:
        print(f"[sweep] resuming sweep {name!r} from {state_url(s)}/{name}", flush=True)
        return tune.Tuner.restore(
            prep.state_path(name),
            trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=sw.retry_failed,
            storage_filesystem=prep.state_fs,
        )
    else:
        scheduler = (
            Asha(sw.stop_metric, sw.grace_images, s.train.total_images, sw.reduction_factor)
            if sw.stop_metric != "none"
            else None
        )
        if scheduler:
            rungs = ", ".join(f"{m:,}" for m in scheduler.milestones())
            print(
                f"[sweep] ASHA on {sw.stop_metric}: rungs at {rungs} images (budget {s.train.total_images:,})",
                flush=True,
            )
        callback = SweepCallback(
            s.tracking.uri, s.tracking.experiment, name, scheduler, [p.path for p in prep.space.params]
        )
        return tune.Tuner(
            trainable,
            param_space=to_tune(prep.space),
            tune_config=tune.TuneConfig(
                num_samples=sw.num_samples,
                scheduler=scheduler,
                # the searcher holds the concurrency limit (Tune ignores max_concurrent_trials beside one)
                search_alg=BasicVariantGenerator(max_concurrent=sw.max_concurrent, random_state=sw.seed),
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=prep.state_root,
                storage_filesystem=prep.state_fs,
                callbacks=[callback],
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                verbose=1,
            ),
        )


class _sigterm_as_sigint:
    """``ray job stop`` sends SIGTERM: turn it into the SIGINT on which Ray Tune stops its trials and
    saves the sweep's state (what a resume starts from). Yields an Event set when it came."""

    def __enter__(self) -> threading.Event:
        self.event = threading.Event()
        self.previous = None
        if threading.current_thread() is threading.main_thread():

            def handler(signum, frame):
                self.event.set()
                os.kill(os.getpid(), signal.SIGINT)

            self.previous = signal.signal(signal.SIGTERM, handler)
        return self.event

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _flag_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, list | dict) else str(v)


# ------------------------------------------------------------------------------------------------
# Results


def record_results(s: SweepSettings, prep: Prepared, rows: list[dict[str, Any]], wall_s: float) -> dict | None:
    """Mark the best trial (child tag sweep.best), and give the parent run the best settings and
    figures (tags, metrics), the table of every trial (artifacts) and a description."""

    uri, exp, metric = s.tracking.uri, s.tracking.experiment, s.sweep.rank_metric
    best = best_row(rows, metric)
    for r in rows:
        r["run_id"] = find_run(uri, exp, r["run_name"])
        r["best"] = best is not None and r is best
    counts = {st: sum(r["status"] == st for r in rows) for st in (FINISHED, STOPPED, FAILED)}
    told = f"{counts[FINISHED]} finished, {counts[STOPPED]} stopped early, {counts[FAILED]} failed"
    doc = {
        "sweep": s.sweep.name,
        "rank_metric": metric,
        "stop_metric": s.sweep.stop_metric,
        "space": prep.space.to_json(),
        "budget_images": s.train.total_images,
        "best": None if best is None else best["run_name"],
        "trials": rows,
        "wall_s": wall_s,
    }
    parent = TrackedRun(uri, prep.parent_run_id)
    try:
        for r in rows:
            if r["run_id"]:
                TrackedRun(uri, r["run_id"]).set_tags({"sweep.best": str(r["best"]).lower()})
        parent.log_bytes(json.dumps(doc, indent=2, default=str).encode(), f"{RESULTS_ARTIFACT}.json")
        parent.log_bytes(results_csv(rows).encode(), f"{RESULTS_ARTIFACT}.csv")
        tags = {"sweep.trials": told}
        note = f"Sweep {s.sweep.name}: {len(rows)} trials ({told}), ranked by {metric}."
        if best is not None:
            tags |= {
                "sweep.best_trial": best["trial"],
                "sweep.best_run_name": best["run_name"],
                "sweep.best_run_id": best["run_id"] or "",
            } | {f"sweep.best.{p}": _flag_value(v) for p, v in best["values"].items()}
            figures = {k: best[k] for k in ("fd", "fd_floor", "val_loss") if isinstance(best.get(k), int | float)}
            parent.log_metrics({f"best/{k}": v for k, v in figures.items() if math.isfinite(v)})
            shown = ", ".join(f"{p}={v}" for p, v in best["values"].items())
            note += f" Best: {best['run_name']} ({shown}), {metric} {best[metric]:.4g}"
            note += f" (real-data floor {best['fd_floor']:.4g})." if metric == "fd" and best.get("fd_floor") else "."
        parent.set_tags(tags | {NOTE_TAG: note})
    except TrackingError as e:
        print(f"WARNING: {e}", flush=True)
    return best
