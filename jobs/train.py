"""Train a DDPM with Ray Train + torch DDP: ``ray job submit -- python jobs/train.py [flags]``.

The configuration is validated before any cluster work (bad values exit 2 naming the field);
``--dry-run`` prints it and stops. A run has an explicit name: a new run never picks up an old
one's checkpoints, and ``--train.resume --train.run-name NAME`` continues NAME deliberately.
A finished, tracked run adds a version to its registered MLflow model (``pipeline.registry``).
The last lines name the run: ``MLFLOW_RUN_ID=<id>`` (when tracked) and ``RUN_NAME=<name>``.
The work is done by ``pipeline.train.launch``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from pipeline.cli import run_job
from pipeline.config import Settings
from pipeline.data.storage import join_url
from pipeline.registry import register
from pipeline.tracking import TrackingError
from pipeline.train import launch
from pipeline.train.run_storage import RunStorage


def _train(settings: Settings, run_id: str | None) -> int:
    t0 = time.time()
    result = launch.launch(settings, run_id)
    name = settings.train.run_name
    print(f"\ntraining run {name!r} finished in {time.time() - t0:.0f} s")
    if run_id and result.error is None:  # a failed or diverged run registers nothing
        try:
            register(settings, run_id)
        except TrackingError as e:  # the run and its checkpoints are there; only the registry entry is missing
            print(f"WARNING: {e}", flush=True)
    # The checkpoints are RunStorage's (Ray Train's result holds none).
    if newest := RunStorage(settings, name, tempfile.gettempdir()).candidates()[:1]:
        print(f"latest checkpoint: {join_url(settings.storage.checkpoint_url, name, Path(newest[0]).name)}")
    if run_id:
        print(f"MLFLOW_RUN_ID={run_id}")
        print(f"MLflow run: {launch.run_page(settings, run_id)}")
    print(f"RUN_NAME={settings.train.run_name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(Settings, _train, argv, prog="jobs/train.py", resolve=launch.name_run, preflight=launch.preflight)


if __name__ == "__main__":
    sys.exit(main())
