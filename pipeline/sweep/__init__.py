"""Hyper-parameter sweeps: Ray Tune trials that are whole training runs plus an evaluation, tracked as
MLflow child runs of one parent run (docs/sweep.md).

``space`` the search space (pure), ``config`` the job's settings, ``trial`` what runs in a Tune trial,
``report`` the Ray Train callback that feeds a trial's validation losses to Tune, ``scheduler`` ASHA and
the Tune callback that records each trial in MLflow, ``results`` the trials' table (pure), ``run`` the
driver: checks, start or resume, the best trial marked. Only ``report``, ``scheduler`` and ``run``'s
functions import Ray Tune.
"""
