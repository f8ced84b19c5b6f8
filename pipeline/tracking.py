"""MLflow tracking that never stalls or stops training.

Only rank 0 of a training run makes a ``Tracker``. Metrics are queued and sent in batches by a
background thread (a synchronous ``log_metric`` costs ~200 ms on the local stack); artifacts go
through the same thread. If the server is unreachable, training goes on, says so once, and the
queue is retried until it is flushed or the run ends.

Metric steps are images seen. After a restart the tracker learns the last step the run already
holds and drops anything at or below it, so a resumed run never logs a step twice or backwards.
"""

from __future__ import annotations

import logging
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_NAME_TAG = "ddpm.run_name"
STEP_METRIC = "train/images_seen"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def find_or_create_run(uri: str, experiment: str, run_name: str) -> str:
    """The MLflow run of a training run (by tag), created on first use: one per training run."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    runs = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=2)
    if runs:
        run_id = runs[0].info.run_id
        if runs[0].info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name})
    return run.info.run_id


class Tracker:
    def __init__(self, uri: str, run_id: str, *, flush_every_s: float = 2.0) -> None:
        self.uri, self.run_id = uri, run_id
        self._q: queue.Queue = queue.Queue()
        self._pending: list = []
        self._flush_every = flush_every_s
        self._stop = threading.Event()
        self._warned = False
        self._tmp = Path(tempfile.mkdtemp(prefix="ddpm-tracker-"))
        self.time_spent = 0.0  # seconds the training thread spent in this class (for the overhead figure)
        self.client = _client(uri)
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

    def close(self, status: str | None = None, timeout: float = 120.0) -> None:
        """Flush everything (bounded by ``timeout``), then end the thread."""
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
                rest.pop(0)
            self._pending = []
        except Exception as e:
            self._warn(e)
            keep = [("metrics", metrics)] if metrics else []
            keep += [("params", params)] if params else []
            self._pending = keep + rest
