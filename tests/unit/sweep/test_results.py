"""ASHA's decisions as the sweep records them (and carries across a resume), and the results table."""

from __future__ import annotations

import math
from types import SimpleNamespace

from pipeline.sweep.results import FAILED, FINISHED, STOPPED, best_row, results_csv, summary_table


def _trial(i: int) -> SimpleNamespace:
    return SimpleNamespace(trial_id=f"abc_{i:05d}")


def test_asha_stops_the_worse_trial_at_a_rung_and_its_rungs_survive_a_resume(capsys):
    from ray.tune.schedulers import TrialScheduler

    from pipeline.sweep.scheduler import Asha

    asha = Asha("val_loss", grace_images=512, total_images=2048, reduction_factor=2)
    assert asha.milestones() == [512, 1024]  # none at the budget: a finished trial is never stopped there
    a, b = _trial(0), _trial(1)
    for t in (a, b):
        asha.on_trial_add(None, t)
    go = TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, a, {"images_seen": 256, "val_loss": 0.9}) == go  # before the first rung
    assert asha.on_trial_result(None, a, {"images_seen": 544, "val_loss": 0.5}) == go  # first at rung 512
    assert asha.on_trial_result(None, a, {"images_seen": 1024, "val_loss": 0.4}) == go
    assert asha.on_trial_result(None, a, {"images_seen": 2048, "val_loss": 0.3}) == go  # the budget: no rung
    assert asha.on_trial_result(None, b, {"images_seen": 512, "val_loss": 0.8}) == TrialScheduler.STOP
    assert [d["decision"] for d in asha.decisions[a.trial_id]] == ["continued", "continued"]
    assert asha.decisions[b.trial_id] == [
        {"rung": 512, "images": 512, "value": 0.8, "cutoff": 0.5, "decision": "stopped"}
    ]
    out = capsys.readouterr().out
    assert "abc_00001 at rung 512 images (512 seen): val_loss 0.8, cutoff 0.5: stopped" in out
    assert "abc_00000 at rung 512 images (544 seen): val_loss 0.5, first at this rung: continues" in out

    # A resumed sweep gets a new scheduler; the saved state restores the rungs, so a new trial is still
    # compared with those that reached a rung before the interruption.
    state = asha.get_state()
    resumed = Asha("val_loss", grace_images=512, total_images=2048, reduction_factor=2)
    resumed.set_state(state)
    c = _trial(2)
    resumed.on_trial_add(None, c)
    assert resumed.on_trial_result(None, c, {"images_seen": 512, "val_loss": 0.7}) == TrialScheduler.STOP
    assert resumed.decisions[a.trial_id] == asha.decisions[a.trial_id]
    fresh = Asha("val_loss", grace_images=512, total_images=2048, reduction_factor=2)
    fresh.on_trial_add(None, c)
    assert fresh.on_trial_result(None, c, {"images_seen": 512, "val_loss": 0.7}) == TrialScheduler.CONTINUE


def _row(trial, status, fd=None, **kw):
    return {"trial": trial, "run_name": f"sw-{trial}", "status": status, "values": {"train.lr": kw.pop("lr", 1e-3)},
            "images_seen": kw.pop("images", 2048), "val_loss": kw.pop("val", 0.3), "fd": fd, "fd_floor": 9.0,
            "wall_s": 30.0, "error": kw.pop("error", None), **kw}  # fmt: skip


def test_best_is_the_lowest_finished_and_the_table_says_why_others_are_not():
    rows = [
        _row("t0", FINISHED, fd=20.0),
        _row("t1", STOPPED, images=512, val=0.8, lr=3e-5),
        _row("t2", FAILED, images=None, val=None, lr=100.0, error="TrialFailed: training diverged"),
        _row("t3", FINISHED, fd=15.0, lr=2e-3),
        _row("t4", FINISHED, fd=math.nan),
    ]
    assert best_row(rows, "fd")["trial"] == "t3"
    assert best_row(rows, "val_loss")["trial"] == "t0"  # ties: the earlier trial
    assert best_row([rows[1], rows[2]], "fd") is None
    rows[3]["best"] = True
    table = summary_table(rows, "fd").splitlines()
    assert table[0].split() == ["trial", "status", "train.lr", "images", "val_loss", "fd", "floor", "wall", "s"]
    assert [line.split()[0] for line in table[1:6]] == ["t3", "t0", "t4", "t1", "t2"]
    assert table[1].split()[:3] == ["t3", "*", "finished"] and "2,048" in table[1]
    assert table[5].split()[:4] == ["t2", "failed", "100.0", "-"]
    assert table[-1] == "  t2: TrialFailed: training diverged"
    csv_text = results_csv(rows).splitlines()
    assert csv_text[0] == "trial,run_name,status,best,train.lr,images_seen,val_loss,fd,fd_floor,wall_s,run_id,error"
    assert csv_text[4].startswith("t3,sw-t3,finished,True,0.002,2048,0.3,15.0,9.0,30.0")
