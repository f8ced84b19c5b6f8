"""The training failure policy on the installed Ray Train (no cluster): what is retried, what fails at
once, what is reported as waiting, and that the policy really reaches the controller."""

import pytest
from ray.train import FailureConfig, ScalingConfig
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
from ray.train.v2._internal.execution.failure_handling import FailureDecision
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from pipeline.data.errors import ShardError
from pipeline.train import policy
from pipeline.train.failures import NotRetryable


def _worker_error(cause: Exception) -> WorkerGroupError:
    try:
        raise RuntimeError("the worker's training function failed") from cause
    except RuntimeError as e:
        return WorkerGroupError("rank 0 failed", {0: e})


def test_permanent_worker_errors_fail_at_once_others_use_the_restart_budget(capsys):
    p = policy.Policy(FailureConfig(max_failures=1))
    assert p.make_decision(_worker_error(ShardError("shard-3.tar: truncated"))) == FailureDecision.RAISE
    assert "not retried" in capsys.readouterr().out
    assert p.make_decision(_worker_error(NotRetryable("no usable checkpoint"))) == FailureDecision.RAISE
    assert p.make_decision(_worker_error(ConnectionResetError())) == FailureDecision.RETRY
    assert p.make_decision(_worker_error(ConnectionResetError())) == FailureDecision.RAISE


def test_a_worker_group_that_cannot_start_yet_is_waiting_not_failed(capsys):
    p = policy.Policy(FailureConfig(max_failures=0), "2 worker(s) of 1 CPU")
    for _ in range(3):
        assert p.make_decision(ControllerError(WorkerGroupStartupTimeoutError(2))) == FailureDecision.RETRY
    out = capsys.readouterr().out
    assert "still waiting for resources for 2 worker(s) of 1 CPU (startup attempt 3)" in out
    assert "failed" not in out.lower()


def test_the_policy_reaches_the_controller(monkeypatch):
    seen = {}
    monkeypatch.setattr(DataParallelTrainer, "_initialize_and_run_controller", lambda self, **kw: seen.update(kw))
    trainer = policy.Trainer(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    trainer._initialize_and_run_controller(failure_policy=object(), scaling_policy=None)
    assert isinstance(seen["failure_policy"], policy.Policy) and "scaling_policy" in seen


def test_a_ray_without_the_private_hand_over_is_refused_by_name(monkeypatch):
    policy.check_ray_api()  # the installed Ray
    monkeypatch.delattr(DataParallelTrainer, "_initialize_and_run_controller")
    with pytest.raises(RuntimeError, match=r"no longer hands its failure policy .* written for ray 2\.60"):
        policy.Trainer(lambda: None, scaling_config=ScalingConfig(num_workers=1))
