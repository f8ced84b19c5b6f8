"""The elastic arithmetic without processes: micro-batches per rank, and the world size logged after a
restart. The real loop in gloo processes resumed across world sizes is tests/integration/test_elastic_gloo.py
(slow)."""

from __future__ import annotations

from pipeline.train.elastic import micro_batches_for


def test_micro_batches_make_up_the_missing_workers():
    assert [micro_batches_for(n, 4, 4, 1) for n in (1, 2, 4)] == [1, 2, 4]
    assert micro_batches_for(2, 4, 2, 1) == 1 and micro_batches_for(4, 4, 2, 2) == 4
    assert micro_batches_for(2, 4, 3, 1) == 2  # 3 workers on 4 partitions: the rank with two does two


def test_world_size_after_a_restart_is_logged_past_the_restored_checkpoint():
    """The checkpoint at N images carries the old group's size (logged when it was written) while the
    run's step history may stop short of N: the new group's size goes to N + 1, never to N."""
    from pipeline.train.elastic import WORLD_SIZE_METRIC, log_world_size

    class Recorder:  # what log_world_size uses of the Tracker
        def __init__(self, min_step):
            self.min_step, self.logged, self.tags = min_step, [], {}

        def log_metrics(self, metrics, step):
            self.logged += [(step, v) for v in metrics.values()]

        def set_tags(self, tags):
            self.tags |= tags

    fresh = Recorder(-1)
    log_world_size(fresh, 2, 0, None, None)
    log_world_size(fresh, 2, 1617, None, None)  # at the checkpoint of 1,617 images
    assert fresh.logged == [(0, 2.0), (1617, 2.0)]
    restarted = Recorder(1600)  # train/images_seen was last logged at 1,600
    log_world_size(restarted, 1, 1617, 2, "s3://b/runs/r/images_000000001617")
    assert restarted.logged == [(1618, 1.0)] and WORLD_SIZE_METRIC == "train/world_size"
    assert list(restarted.tags.values()) == ["2 -> 1 workers at 1,617 images (resumed from images_000000001617)"]
    ahead = Recorder(2000)  # the lost group had logged further than its last checkpoint
    log_world_size(ahead, 1, 1617, 2, "s3://b/runs/r/images_000000001617")
    assert ahead.logged == [(2001, 1.0)]
