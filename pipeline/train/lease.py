"""One job at a time per run name on a Ray cluster. Two jobs training the same run would write the same
checkpoint names and MLflow steps over each other; the second one (say, a ``--train.resume`` sent while
the first still runs) is refused before it touches anything.

The lease is a named actor in its own namespace, owned by the job's driver and placed on the driver's
node: Ray's GCS refuses a second live actor under one name, and an actor dies with the process that
owns it, so a driver that crashes or is killed (``ray job stop``, SIGKILL, a lost head node) cannot
leave a stale lease behind, and losing another node cannot take the lease from a live driver. It
holds no CPU. Jobs on another Ray cluster that share the checkpoint storage are not covered.
"""

from __future__ import annotations

import json
import os
import socket

from pipeline.config import ConfigError

NAMESPACE = "ddpm-run-leases"
_HELD: dict[str, object] = {}  # run name -> this process's lease actor


class RunBusyError(ConfigError):
    """Another live job holds the run name."""


class _Lease:
    def __init__(self, holder: str):
        self.holder = holder

    def who(self) -> str:
        return self.holder


def _this_job() -> str:
    """``Ray job <id> (pid, host)``: the submission id when submitted (Ray's job supervisor passes it to
    the entrypoint in this variable's metadata), else Ray's job id (a driver or a sweep's trial)."""
    import ray

    try:
        job = json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])["metadata"]["job_submission_id"]
    except (KeyError, TypeError, ValueError):
        job = ray.get_runtime_context().get_job_id()
    return f"Ray job {job} (pid {os.getpid()} on {socket.gethostname()})"


def acquire(run_name: str) -> None:
    """Hold ``run_name`` for this process (connected to Ray) until ``release`` or its exit; ``RunBusyError``
    naming the holder if another job holds it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if run_name in _HELD:
        return
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0, max_restarts=0, scheduling_strategy=here)(_Lease)
    try:
        _HELD[run_name] = actor.options(name=run_name, namespace=NAMESPACE).remote(_this_job())
    except ValueError:  # the name is taken
        try:
            holder = ray.get(ray.get_actor(run_name, namespace=NAMESPACE).who.remote(), timeout=60)
        except Exception:  # it ended in between, or does not answer
            holder = "another job"
        raise RunBusyError(
            f"error: run {run_name!r} is being trained by {holder}; wait until it ends or stop it "
            "(`ray job stop`), then resubmit with --train.resume, or choose another --train.run-name"
        ) from None


def release(run_name: str) -> None:
    """Give the name back (a sweep's driver trains many runs); a no-op if this process does not hold it."""
    import ray

    if (lease := _HELD.pop(run_name, None)) is not None:
        ray.kill(lease)
