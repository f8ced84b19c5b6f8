#!/usr/bin/env python
"""Evaluation sampling: images from a training run's checkpoint, fanned out over Ray, results into MLflow.

    python jobs/sample.py --run-id RUN [--num-images 1000] [--sample.method ddim --sample.steps 50 |
                          --sample.method ancestral] [--checkpoint latest|images_<N>] [--no-ema] [--workers N] ...
    python jobs/sample.py --model models:/NAME@champion | models:/NAME/VERSION [--promote ALIAS] ...
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/sample.py --run-id RUN

Prints the summary (artifacts, metrics, cost) as JSON. The work is ``pipeline.sample.evaluate``
(``pipeline.registry.evaluate_model`` for --model); see docs/sampling.md. Exit status: 0 done, 1 the run / model / checkpoint / data / cluster cannot be
used (the message says which), 2 invalid configuration (the message names the field).
"""

from __future__ import annotations

import json
import sys

from pipeline.cli import run_job
from pipeline.registry import evaluate_model
from pipeline.sample.evaluate import evaluate
from pipeline.sample.settings import SampleSettings


def _sample(settings: SampleSettings) -> None:
    summary = evaluate_model(settings) if settings.model else evaluate(settings)
    print(json.dumps(summary, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    return run_job(SampleSettings, _sample, argv, prog="sample.py", echo=False)


if __name__ == "__main__":
    sys.exit(main())
