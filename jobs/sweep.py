"""Hyper-parameter sweep: ``ray job submit -- python jobs/sweep.py --sweep.space SPACE.yaml [training flags]``.

Each trial is a whole training run (the training flags plus the trial's values from the space) and
an evaluation of it with the pipeline's sampling job; ASHA stops trials whose validation loss falls
behind; every trial is an MLflow child run of the sweep's parent run, the best one marked. The space
and every setting are checked before any trial starts (exit 2 naming the problem); ``--dry-run``
prints them and the resolved space. ``--sweep.resume --sweep.name NAME`` continues an interrupted
sweep. The last lines name the parent run: ``SWEEP_RUN_ID=<id>`` and ``SWEEP_NAME=<name>``.
The work is done by ``pipeline.sweep``; see docs/sweep.md.
"""

from __future__ import annotations

import sys

from pipeline.cli import run_job
from pipeline.sweep import run
from pipeline.sweep.config import SweepSettings


def main(argv: list[str] | None = None) -> int:
    return run_job(
        SweepSettings, run.run_sweep, argv, prog="jobs/sweep.py", resolve=run.resolve, preflight=run.preflight
    )


if __name__ == "__main__":
    sys.exit(main())
