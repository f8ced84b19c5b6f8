"""Train a DDPM with Ray Train + torch DDP: ``ray job submit -- python jobs/train.py [flags]``.

The configuration is validated before any cluster work (bad values exit 2 naming the field);
``--dry-run`` prints it and stops. A run has an explicit name: a new run never picks up an old
one's checkpoints, and ``--train.resume --train.run-name NAME`` continues NAME deliberately.
The last lines name the run: ``MLFLOW_RUN_ID=<id>`` (when tracked) and ``RUN_NAME=<name>``.
The work is done by ``pipeline.train.launch``.
"""

from __future__ import annotations

import sys
import time

from pipeline.cli import run_job
from pipeline.config import Settings
from pipeline.train import launch


def _train(settings: Settings) -> int:
    run_id = launch.preflight(settings)
    t0 = time.time()
    result = launch.launch(settings, run_id)
    print(f"\ntraining run {settings.train.run_name!r} finished in {time.time() - t0:.0f} s")
    if result.checkpoint:
        print(f"latest checkpoint: {result.checkpoint.path}")
    if run_id:
        print(f"MLFLOW_RUN_ID={run_id}")
        print(f"MLflow run: {launch.run_page(settings, run_id)}")
    print(f"RUN_NAME={settings.train.run_name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(Settings, _train, argv, prog="jobs/train.py", resolve=launch.name_run)


if __name__ == "__main__":
    sys.exit(main())
