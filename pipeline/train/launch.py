"""Training on a Ray cluster: the checks before any cluster work, Ray Train's TorchTrainer, and the
worker side, which runs ``train_worker`` with its checkpoints in the run's directory of Ray Train's
storage (``RunStorage``: S3 through pyarrow, riding through outages). A run has an explicit name: a
new run never picks up an old one's checkpoints, and ``train.resume`` continues the named run
deliberately."""

from __future__ import annotations

import os
import time
import uuid

from pipeline import cluster
from pipeline.config import ConfigError, Settings
from pipeline.data.manifest import check_matches, open_manifest
from pipeline.data.storage import filesystem
from pipeline.tracking import find_or_create_run
from pipeline.train import lease
from pipeline.train.checkpointer import Session
from pipeline.train.hosts import check_reachable, driver_login, endpoints, gather_rank_hosts, worker_env_vars
from pipeline.train.loop import train_worker
from pipeline.train.run_storage import RunStorage


def name_run(settings: Settings) -> None:
    """A new timestamped ``train.run_name`` when none is given."""
    if not settings.train.run_name:
        settings.train.run_name = time.strftime("ddpm-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def preflight(settings: Settings) -> str | None:
    """Check what must hold before the cluster trains (the data matches the settings, the run name is
    new or resumed on purpose, the cluster has the devices asked for, no other job trains the run;
    ``ConfigError`` otherwise), then find or create the MLflow run. Returns its id (None: untracked).
    The run's lease (pipeline/train/lease.py) is held from here until ``launch`` returns."""

    name, where = settings.train.run_name, settings.storage.checkpoint_url
    try:
        manifest = open_manifest(settings.data.url, settings.storage, "train")
        check_matches(
            manifest,
            image_size=settings.data.image_size,
            channels=settings.data.channels,
            resize=settings.data.resize,
        )
        exists = run_exists(settings, name)
    except Exception as e:  # the data layer's errors name the URL and the cause
        raise ConfigError(f"error: {e}") from e
    if exists and not settings.train.resume:
        raise ConfigError(
            f"error: a run named {name!r} already exists under {where}; "
            f"pass --train.resume to continue it, or choose another --train.run-name"
        )
    if settings.train.resume and not exists:
        raise ConfigError(f"error: --train.resume: no run named {name!r} under {where}")
    connect_and_choose_device(settings)
    lease.acquire(name)
    if not settings.train.resume and run_exists(settings, name):  # written by a job that ended meanwhile
        lease.release(name)
        raise ConfigError(f"error: a run named {name!r} now exists under {where}; choose another --train.run-name")
    if not settings.tracking.uri:
        return None

    try:
        return find_or_create_run(settings.tracking.uri, settings.tracking.experiment, name)
    except Exception as e:
        print(f"WARNING: MLflow at {settings.tracking.uri} unreachable ({e}); training continues untracked", flush=True)
        return None


def run_exists(settings: Settings, run_name: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(settings.storage.checkpoint_url, settings.storage)
    return fs.get_file_info(f"{path}/{run_name}").type != pafs.FileType.NotFound


def choose_device(settings: Settings, gpus: float) -> bool:
    """True if the workers get a GPU each on a cluster with ``gpus`` GPUs; refuses what cannot work."""
    workers = settings.cluster.max_workers
    fit = max((k for k in range(1, int(gpus) + 1) if settings.train.batch_size % k == 0), default=None)
    use_gpu, _ = cluster.choose_device(settings.cluster.use_gpu, gpus, workers, suggest=fit)
    if settings.train.precision == "bf16" and not use_gpu:
        raise cluster.DeviceError(
            "train.precision=bf16 needs GPU workers, and these run on CPU (bf16 autocast is about 300x "
            "slower than fp32 on CPUs); use --train.precision fp32"
        )
    return use_gpu


def connect_and_choose_device(settings: Settings) -> bool:
    """Connect to the cluster, then ``choose_device`` for its GPUs."""
    cluster.connect(settings.cluster.address)
    import ray

    return choose_device(settings, ray.cluster_resources().get("GPU", 0))


def launch(settings: Settings, mlflow_run_id: str | None, *, callbacks: list | None = None):
    """Run the TorchTrainer for ``train.run_name`` on the cluster of ``settings.cluster``; returns Ray
    Train's Result (a failed run raises ``TrainingFailed``). ``callbacks``: Ray Train callbacks of the
    run (a sweep's report to Ray Tune)."""
    from pipeline.train.policy import fit

    use_gpu = connect_and_choose_device(settings)
    run_name = settings.train.run_name
    lease.acquire(run_name)  # held since preflight when it ran
    try:
        trainer = _trainer(settings, mlflow_run_id, use_gpu, callbacks)
        each = "one GPU" if use_gpu else f"{settings.cluster.threads_per_worker} CPU"
        print(f"waiting for {settings.cluster.num_workers} Ray Train workers ({each} each) to start ...", flush=True)
        trainer.waiting_for = f"{settings.cluster.num_workers} worker(s) of {each}"
        return fit(trainer, settings.tracking.uri, mlflow_run_id)
    finally:
        lease.release(run_name)


def _trainer(settings: Settings, mlflow_run_id: str | None, use_gpu: bool, callbacks: list | None):
    """Ray Train's TorchTrainer for the run, its worker config and the environment its controller reads."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from pipeline.train.policy import Trainer

    fs, path = filesystem(settings.storage.checkpoint_url, settings.storage)
    run_name = settings.train.run_name
    # Secrets travel inside the Ray cluster only, in the worker config (never printed).
    config = {"settings": settings.model_dump(mode="python"), "run_name": run_name, "mlflow_run_id": mlflow_run_id}
    # The workers follow the driver's decision: under Ray a CPU worker still sees the node's GPUs.
    config["settings"]["cluster"]["use_gpu"] = "yes" if use_gpu else "no"
    config["settings"]["storage"]["secret_access_key"] = (
        settings.storage.secret_access_key.get_secret_value() if settings.storage.secret_access_key else None
    )
    config["mlflow_login"] = driver_login()
    trainer = Trainer(
        _worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            # a (min, max) range is Ray Train's elastic group: it starts with what fits, restarts on the
            # workers that remain after a loss, and grows back when capacity returns
            num_workers=(c.min_workers, c.max_workers) if (c := settings.cluster).elastic else c.max_workers,
            elastic_resize_monitor_interval_s=c.resize_interval_s,
            use_gpu=use_gpu,
            resources_per_worker=None if use_gpu else {"CPU": settings.cluster.threads_per_worker},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=settings.cluster.max_failures),
            callbacks=callbacks,
            worker_runtime_env={
                "env_vars": {
                    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                    "OMP_NUM_THREADS": str(settings.cluster.threads_per_worker),
                    **worker_env_vars(settings),
                }
            },
        ),
    )
    # The watcher only forwards node-drain notices to ray.train.get_preemption_info(), which the loop
    # does not read (a preempted worker is still retried from the last checkpoint), and starting it
    # logs a core_worker error about its restartable constructor arguments on every run.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if settings.cluster.worker_start_timeout_s:  # Ray Train passes it from the driver to its controller
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(settings.cluster.worker_start_timeout_s)
    return trainer


def run_page(settings: Settings, mlflow_run_id: str) -> str:
    """The MLflow UI address of a run."""
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(settings.tracking.uri).get_experiment_by_name(settings.tracking.experiment)
    return f"{settings.tracking.uri.rstrip('/')}/#/experiments/{exp.experiment_id if exp else '0'}/runs/{mlflow_run_id}"


def _worker(config: dict) -> None:
    """Entry point of each Ray Train worker: ``train_worker`` with a Session over the run's storage."""
    import ray.train

    _quiet_ray_reports()
    settings = Settings.model_validate(config["settings"])
    os.environ.update(config.get("mlflow_login") or {})
    rank0 = ray.train.get_context().get_world_rank() == 0
    check_reachable(endpoints(settings, tracked=rank0), wait_s=settings.storage.outage_s)
    gather_rank_hosts()
    run = RunStorage(settings, config["run_name"], os.environ.get("TMPDIR", "/tmp"))

    def report(metrics, directory, name):
        # Ray Train gets metrics only: checkpoints, their retention and their outages are RunStorage's.
        if directory is not None:
            written = run.upload(directory, name)
            run.retain(settings.train.keep_checkpoints, written)
        ray.train.report(metrics)

    session = Session(report=report, candidates=run.candidates, fetch=run.fetch, unusable=run.mark_unusable)
    try:
        train_worker(settings, session, config.get("mlflow_run_id"))
    finally:
        run.close()


def _quiet_ray_reports() -> None:
    """Ray Train prints every report (``TrainingReport(...)``, a dict dump) and every checkpoint upload at
    INFO on each worker; rank 0's progress line says what matters once. Warnings and errors still show."""
    import logging

    from ray.train.v2._internal.execution import context, storage

    for logger in (context.logger, storage.logger):
        logger.setLevel(logging.WARNING)
