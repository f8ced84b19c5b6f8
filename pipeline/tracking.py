"""The door to MLflow's runs and metrics: every run the pipeline creates, reads or writes goes through
here (registered models and their versions are ``pipeline.registry``'s).

Training (``Tracker``): only rank 0 of a training run makes one. Metrics are queued and sent in
batches by a background thread (a synchronous ``log_metric`` costs ~200 ms on the local stack);
artifacts go through the same thread. If the server is unreachable, training goes on, says so
once, and the queue is retried until it is flushed or the run ends. Metric steps are images seen.
After a restart the tracker learns the last step the run already holds and drops anything at or
below it, so a resumed run never logs a step twice or backwards.

Evaluation (``TrackedRun``): the sampling job reads an existing run (params, ``config.json``, the
sampling checkpoints under ``checkpoints/``) and writes its results into it under ``eval/``,
synchronously: there a failure must stop the job with a message naming the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.checkpoint import checkpoint_name, images_of
from pipeline.errors import JobError
from pipeline.scratch import scratch_dir

log = logging.getLogger(__name__)

RUN_NAME_TAG = "ddpm.run_name"
STEP_METRIC = "train/images_seen"
CHECKPOINT_DIR = "checkpoints"  # sampling checkpoints: checkpoints/images_<N>.pt
CONFIG_ARTIFACT = "config.json"  # the resolved settings of a training run
EVAL_DIR = "eval"  # evaluations: artifacts eval/<name>/..., metrics eval/<sampler tag>/<figure>
NOTE_TAG = "mlflow.note.content"  # the run page's description
FAILURE_TAG = "ddpm.failure_reason"  # why a run ended FAILED or KILLED
SWEEP_TAG = "ddpm.sweep"  # a sweep's parent run: the sweep's name (its trials' runs are its children)
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: nests a child run under its parent in the UI


class TrackingError(JobError):
    """An MLflow run or one of its artifacts cannot be read or written; the message names the run and what."""


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def find_or_create_run(
    uri: str, experiment: str, run_name: str, *, tag: str = RUN_NAME_TAG, tags: dict[str, str] | None = None
) -> str:
    """The MLflow run whose ``tag`` is ``run_name`` (a training run's: ``ddpm.run_name``), created on
    first use: one per training run (or sweep). ``tags`` are set on it, found or created."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    runs = client.search_runs([exp_id], filter_string=f"tags.`{tag}` = '{run_name}'", max_results=2)
    if runs and tags:
        from mlflow.entities import RunTag

        client.log_batch(runs[0].info.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    if runs:
        run_id = runs[0].info.run_id
        if runs[0].info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        if FAILURE_TAG in runs[0].data.tags:  # a resumed run is no longer failed; a new failure tags it again
            client.delete_tag(run_id, FAILURE_TAG)
        return run_id
    run = client.create_run(exp_id, run_name=run_name, tags={tag: run_name, **(tags or {})})
    return run.info.run_id


def find_run(uri: str, experiment: str, run_name: str, *, tag: str = RUN_NAME_TAG) -> str | None:
    """The id of the MLflow run whose ``tag`` is ``run_name``, or None."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`{tag}` = '{run_name}'", max_results=1) if exp else []
    return runs[0].info.run_id if runs else None


def end_run(uri: str, run_id: str, status: str, reason: str, *, tries: int = 5) -> bool:
    """End a training run as FAILED or KILLED with ``reason`` as the ``ddpm.failure_reason`` tag (the
    driver's side: the workers are gone). Retried for a few seconds; False if MLflow stayed away."""
    from mlflow.entities import RunTag

    client = mlflow_client(uri)
    for attempt in range(tries):
        try:
            client.log_batch(run_id, tags=[RunTag(FAILURE_TAG, reason[:5000])])
            client.set_terminated(run_id, status=status)
            return True
        except Exception as e:  # noqa: BLE001 - the job's own error matters more than this one
            if attempt == tries - 1:
                log.warning("MLflow run %s not marked %s: %s", run_id, status, e)
            time.sleep(min(2.0**attempt, 5.0))
    return False


class Tracker:
    def __init__(self, uri: str, run_id: str, *, flush_every_s: float = 2.0) -> None:
        self.uri, self.run_id = uri, run_id
        self._q: queue.Queue = queue.Queue()
        self._pending: list = []
        self._flush_every = flush_every_s
        self._stop = threading.Event()
        self._warned = False
        self._tmp = scratch_dir("tracker")
        self.time_spent = 0.0  # seconds the training thread spent in this class (for the overhead figure)
        self.client = mlflow_client(uri)
        try:  # the last step the run already holds (after a restart)
            self.min_step = max((m.step for m in self.client.get_metric_history(run_id, STEP_METRIC)), default=-1)
        except Exception as e:  # unreachable server: keep training
            self._warn(e)
            self.min_step = -1
        self._thread = threading.Thread(target=self._worker, name="mlflow-tracker", daemon=True)
        self._thread.start()

    # -- called from the training loop: must return at once ------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step <= self.min_step:
            return
        t0 = time.perf_counter()
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._q.put(("metrics", [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]))
        self.time_spent += time.perf_counter() - t0

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self._q.put(("params", [Param(k, str(v)[:6000]) for k, v in params.items()]))

    def log_bytes(self, data: bytes, name: str, artifact_path: str | None = None) -> None:
        dst = self._tmp / f"{time.monotonic_ns()}" / name
        dst.parent.mkdir(parents=True)
        dst.write_bytes(data)
        self._q.put(("artifact", (dst, artifact_path)))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._q.put(("tags", [RunTag(k, str(v)) for k, v in tags.items()]))

    def log_datasets(self, datasets: list[tuple[str, str, str, str]]) -> None:
        """Dataset inputs of the run page: (name, source URL, digest, context) each."""
        self._q.put(("inputs", [dataset_input(*d) for d in datasets]))

    def start_system_metrics(self, every_s: float = 10.0) -> None:
        """MLflow's own CPU / memory / disk / network (and GPU where present) figures under system/,
        sampled by MLflow's thread; a failure to start costs only those figures."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start/stop lines
            self._system = SystemMetricsMonitor(
                self.run_id, sampling_interval=every_s, resume_logging=True, tracking_uri=self.uri
            )
            self._system.start()
        except Exception as e:
            log.warning("MLflow system metrics not started: %s", e)

    def log_settings(self, settings: Any, extra_params: dict[str, Any] | None = None) -> None:
        """A job's resolved settings (``JobSettings``): flattened as params, and whole as config.json."""
        self.log_params(settings.flat_params() | (extra_params or {}))
        self.log_bytes(settings.dump().encode(), CONFIG_ARTIFACT)

    def log_checkpoint(self, images_seen: int, export: bytes) -> None:
        """A sampling checkpoint (``pipeline.checkpoint.sampling_export``), where the sampling job looks."""

        self.log_bytes(export, f"{checkpoint_name(images_seen)}.pt", CHECKPOINT_DIR)

    def close(self, status: str | None = None, timeout: float = 120.0) -> None:
        """Flush everything (bounded by ``timeout``), then end the thread."""
        if system := getattr(self, "_system", None):
            system.finish()
            with contextlib.suppress(Exception):  # what it sampled since its last log (all of a short run)
                if last := system.aggregate_metrics():
                    system.publish_metrics(last)
                    system.mlflow_logger.flush()
        if status:
            self._q.put(("status", status))
        self._q.put(("flush", None))
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive() or self._pending or not self._q.empty():
            log.warning("MLflow: could not send everything before closing (server unreachable?)")
        shutil.rmtree(self._tmp, ignore_errors=True)

    # -- background thread -----------------------------------------------------------------------------
    def _warn(self, e: Exception) -> None:
        if not self._warned:
            self._warned = True
            log.warning("MLflow tracking server %s unreachable (%s); training continues and retries", self.uri, e)
            print(f"WARNING: MLflow tracking server {self.uri} unreachable ({type(e).__name__}); training continues")

    def _worker(self) -> None:
        last_flush = time.monotonic()
        while True:
            try:
                item = self._q.get(timeout=0.2)
                self._pending.append(item)
            except queue.Empty:
                item = None
            due = time.monotonic() - last_flush > self._flush_every
            if self._pending and (due or (item and item[0] in ("artifact", "flush", "status"))):
                self._send()
                last_flush = time.monotonic()
            if self._stop.is_set() and self._q.empty():
                # Final attempts while closing, then give up.
                for _ in range(3):
                    if not self._pending:
                        break
                    self._send()
                    if self._pending:
                        time.sleep(1.0)
                return

    def _send(self) -> None:
        metrics, params, rest = [], [], []
        for kind, payload in self._pending:
            if kind == "metrics":
                metrics.extend(payload)
            elif kind == "params":
                params.extend(payload)
            elif kind != "flush":
                rest.append((kind, payload))
        try:
            # MLflow's batch limits: 100 params, 1000 metrics per call.
            for i in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[i : i + 100])
            params = []
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
            metrics = []
            while rest:
                kind, payload = rest[0]
                if kind == "artifact":
                    src, artifact_path = payload
                    self.client.log_artifact(self.run_id, str(src), artifact_path)
                    shutil.rmtree(src.parent, ignore_errors=True)
                elif kind == "status":
                    self.client.set_terminated(self.run_id, status=payload)
                elif kind == "tags":
                    self.client.log_batch(self.run_id, tags=payload)
                elif kind == "inputs":
                    self.client.log_inputs(self.run_id, datasets=payload)
                rest.pop(0)
            self._pending = []
        except Exception as e:
            self._warn(e)
            keep = [("metrics", metrics)] if metrics else []
            keep += [("params", params)] if params else []
            self._pending = keep + rest


class TrackedRun:
    """An existing MLflow run, read and written synchronously: the sampling job's side of a run."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self.client = mlflow_client(uri)
        from mlflow.exceptions import MlflowException

        try:
            self._run = self.client.get_run(run_id)
        except MlflowException as e:
            if getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(e).lower():
                raise TrackingError(f"MLflow run {run_id!r} not found at {uri}") from None
            raise TrackingError(f"cannot read MLflow run {run_id!r} at {uri}: {e}") from None
        except Exception as e:  # connection refused, DNS, ...
            raise TrackingError(f"cannot reach the MLflow tracking server {uri} to read run {run_id!r}: {e}") from None

    @property
    def params(self) -> dict[str, str]:
        return dict(self._run.data.params)

    def checkpoints(self) -> dict[int, str]:
        """images_seen -> artifact path of every sampling checkpoint of the run."""

        out = {}
        for f in self.client.list_artifacts(self.run_id, CHECKPOINT_DIR):
            n = images_of(f.path)
            if not f.is_dir and f.path.endswith(".pt") and n is not None:
                out[n] = f.path
        return out

    def download(self, artifact: str, dst: str | Path) -> Path:
        """The artifact's local path, under ``dst``."""
        try:
            return Path(self.client.download_artifacts(self.run_id, artifact, str(dst)))
        except Exception as e:
            raise TrackingError(f"cannot download artifact {artifact!r} of MLflow run {self.run_id!r}: {e}") from None

    def settings(self, dst: str | Path) -> dict[str, Any] | None:
        """The run's config.json (its resolved settings), or None if it has none."""
        try:
            return json.loads(self.download(CONFIG_ARTIFACT, dst).read_text())
        except (TrackingError, ValueError):
            return None

    def append_note(self, text: str) -> None:
        """Add a paragraph to the run's description (the training job writes the first)."""
        note = self.client.get_run(self.run_id).data.tags.get(NOTE_TAG, "")
        try:
            self.client.set_tag(self.run_id, NOTE_TAG, f"{note}\n\n{text}" if note else text)
        except Exception as e:
            raise TrackingError(f"could not update the description of MLflow run {self.run_id!r}: {e}") from None

    @property
    def status(self) -> str:
        """RUNNING, FINISHED, FAILED or KILLED, as the server has it now."""
        return self.client.get_run(self.run_id).info.status

    @property
    def tags(self) -> dict[str, str]:
        return dict(self.client.get_run(self.run_id).data.tags)

    def set_tags(self, tags: dict[str, Any], delete: tuple[str, ...] = ()) -> None:
        """Set ``tags`` and delete those of ``delete`` that the run holds."""
        from mlflow.entities import RunTag

        try:
            if tags:
                self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])
            held = self.tags if delete else {}
            for k in delete:
                if k in held:
                    self.client.delete_tag(self.run_id, k)
        except Exception as e:
            raise TrackingError(f"could not set tags on MLflow run {self.run_id!r}: {e}") from None

    def log_new_params(self, params: dict[str, Any]) -> dict[str, tuple[str, str]]:
        """Log the params the run does not hold yet (MLflow params never change); returns the held
        ones whose value differs, name -> (held, given)."""
        from mlflow.entities import Param

        held = dict(self.client.get_run(self.run_id).data.params)
        given = {k: str(v)[:6000] for k, v in params.items()}
        new = [Param(k, v) for k, v in given.items() if k not in held]
        try:
            for i in range(0, len(new), 100):
                self.client.log_batch(self.run_id, params=new[i : i + 100])
        except Exception as e:
            raise TrackingError(f"could not log params to MLflow run {self.run_id!r}: {e}") from None
        return {k: (held[k], v) for k, v in given.items() if k in held and held[k] != v}

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        try:
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])
        except Exception as e:
            raise TrackingError(f"could not log metrics to MLflow run {self.run_id!r}: {e}") from None

    def log_bytes(self, data: bytes, name: str, artifact_path: str | None = None) -> None:
        with tempfile.TemporaryDirectory(prefix="ddpm-artifact-") as tmp:
            (Path(tmp) / name).write_bytes(data)
            try:
                self.client.log_artifact(self.run_id, str(Path(tmp) / name), artifact_path)
            except Exception as e:
                raise TrackingError(f"could not log artifact {name!r} to MLflow run {self.run_id!r}: {e}") from None

    def set_status(self, status: str) -> None:
        """RUNNING again, or ended FINISHED / FAILED / KILLED (``end_run`` also says why)."""
        try:
            if status == "RUNNING":
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                self.client.set_terminated(self.run_id, status=status)
        except Exception as e:
            raise TrackingError(f"could not mark MLflow run {self.run_id!r} {status}: {e}") from None

    def last_metric(self, key: str) -> tuple[int, float] | None:
        """(step, value) of the highest step of metric ``key``, or None."""
        hist = self.client.get_metric_history(self.run_id, key)
        return max(((m.step, m.value) for m in hist), default=None)

    def log_evaluation(self, name: str, local_dir: str | Path, metrics: dict[str, float], step: int) -> str:
        """The files of ``local_dir`` as artifacts ``eval/<name>/...`` and ``metrics`` (full keys) at
        ``step``; returns the artifact folder."""
        from mlflow.entities import Metric

        folder = f"{EVAL_DIR}/{name}"
        ts = int(time.time() * 1000)
        try:
            self.client.log_artifacts(self.run_id, str(local_dir), folder)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])
        except Exception as e:
            raise TrackingError(f"could not log the results to MLflow run {self.run_id!r}: {e}") from None
        return folder


def dataset_input(name: str, url: str, digest: str, context: str):
    """An MLflow dataset input: metadata only (the shards stay where they are), named by its source URL."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    entity = MetaDataset(resolve_dataset_source(url), name=name, digest=digest)._to_mlflow_entity()
    return DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def eval_metric_key(sampler_tag: str, figure: str) -> str:
    """MLflow key of an evaluation figure: one curve per sampler over the run's checkpoints."""
    return f"{EVAL_DIR}/{sampler_tag}/{figure}"
