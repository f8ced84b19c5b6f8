"""Hyper-parameter sweeps: Ray Tune trials that are whole training runs plus an evaluation, tracked as
MLflow child runs of one parent run. ``space`` (the search space, pure), ``config`` (the job's settings),
``trial`` (what runs in a Tune trial), ``scheduler`` (ASHA and the Tune callback that records trials in
MLflow), ``run`` (the driver: start or resume, summarise, mark the best). See docs/sweep.md."""
