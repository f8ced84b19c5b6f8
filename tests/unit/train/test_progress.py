"""The operator's progress line: its interval on the wall clock, its figures and ETA (a fake clock)."""

from __future__ import annotations

from pipeline.train.reporting import Progress, duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_is_due_every_interval_and_reads_well_in_logs():
    clock, printed = Clock(), []
    p = Progress(10_000, 10.0, clock=clock, out=lambda line, flush: printed.append(line))
    clock.now += 9.9
    assert not p.due()
    clock.now += 0.1
    assert p.due()
    line = p.report(2_000, 0.12345)
    assert printed == [line] and "\r" not in line and "\n" not in line
    assert line.startswith("[train] 2,000/10,000 images (20.0%)")
    assert "loss 0.1235" in line and "200 images/s" in line and "last checkpoint none yet" in line
    assert "ETA 40s" in line  # 8,000 images left at 200 images/s
    assert not p.due()  # the next one is an interval after this one
    clock.now += 10.0
    assert p.due()


def test_rate_is_over_the_last_interval_eta_over_the_whole_run():
    clock = Clock()
    p = Progress(100_000, 10.0, images_seen=40_000, clock=clock, out=lambda *a, **k: None)  # resumed at 40k
    clock.now += 10.0
    p.report(50_000, 0.1)  # 1,000 images/s
    p.checkpointed(50_000)
    clock.now += 10.0
    line = p.line(52_000, 0.1)  # 200 images/s over this interval; 600 on average
    assert "200 images/s" in line
    assert "ETA 1m20s" in line  # 48,000 left at 600 images/s
    assert "last checkpoint 50,000 images, 10s ago" in line
    assert "| done |" in p.line(100_000, 0.1)


def test_duration():
    assert [duration(s) for s in (0, 59.4, 61, 3599, 3600, 7620)] == ["0s", "59s", "1m01s", "59m59s", "1h00m", "2h07m"]
