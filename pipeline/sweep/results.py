"""A sweep's trials as rows (what ``SweepCallback`` collects), the best of them, and their table. Pure."""

from __future__ import annotations

import csv
import io
import math
from typing import Any

# The trial's statuses, as the MLflow tag sweep.status has them.
FINISHED, STOPPED, FAILED = "finished", "stopped_early", "failed"


def rank_key(row: dict[str, Any], metric: str) -> float | None:
    v = row.get(metric)
    return float(v) if row["status"] == FINISHED and isinstance(v, int | float) and math.isfinite(v) else None


def best_row(rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The finished trial with the lowest ``metric`` (ties: the earlier trial)."""
    ranked = [r for r in rows if rank_key(r, metric) is not None]
    return min(ranked, key=lambda r: rank_key(r, metric)) if ranked else None


def results_csv(rows: list[dict[str, Any]]) -> str:
    paths = sorted({p for r in rows for p in r["values"]})
    cols = ["trial", "run_name", "status", "best", *paths, "images_seen", "val_loss", "fd", "fd_floor", "wall_s"]
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow([*cols, "run_id", "error"])
    for r in rows:
        w.writerow(
            [r["values"].get(c, "") if c in paths else r.get(c, "") for c in cols] + [r.get("run_id"), r["error"]]
        )
    return out.getvalue()


def summary_table(rows: list[dict[str, Any]], metric: str) -> str:
    """The trials as a text table, best first by ``metric``, then the stopped, then the failed."""
    paths = sorted({p for r in rows for p in r["values"]})
    order = {FINISHED: 0, STOPPED: 1, FAILED: 2}
    rows = sorted(rows, key=lambda r: (order.get(r["status"], 3), rank_key(r, metric) or math.inf))
    head = ["trial", "status", *paths, "images", "val_loss", "fd", "floor", "wall s"]

    def fmt(v: Any, digits: str = ".4g") -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, digits)

    table = [head] + [
        [
            r["trial"] + (" *" if r.get("best") else ""),
            r["status"],
            *(str(r["values"].get(p, "")) for p in paths),
            fmt(None if r["images_seen"] is None else int(r["images_seen"]), ","),
            fmt(r["val_loss"]),
            fmt(r["fd"]),
            fmt(r["fd_floor"]),
            fmt(r["wall_s"], ".0f"),
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    errors = [f"  {r['trial']}: {r['error']}" for r in rows if r["error"]]
    return "\n".join(lines + (["failed trials:", *errors] if errors else []))
