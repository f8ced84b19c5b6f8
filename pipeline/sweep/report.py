"""The Ray Train callback that hands a trial's validation reports to Ray Tune (imports Ray Tune)."""

from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

REPORTED = ("val_loss", "images_seen")


class ValidationReport(TuneReportCallback):
    """Rank 0's reports that carry a validation loss, once per images-seen count, with only the keys
    the scheduler reads: Tune checks every result for its scheduler's metric, and the checkpoint
    reports before the first validation carry none."""

    def __init__(self) -> None:
        super().__init__()
        self.last_images = -1

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        m = metrics[0]
        if "val_loss" not in m or int(m.get("images_seen", -1)) <= self.last_images:
            return
        self.last_images = int(m["images_seen"])
        super().after_report(run_context, [{k: m[k] for k in REPORTED}], None)
