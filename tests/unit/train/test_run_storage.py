"""Storage outages: ride_out's retry window, and RunStorage's upload, listing and retention on a local
directory (the S3 paths are exercised by tests/integration/test_faults.py)."""

import time

import pytest

from pipeline.checkpoint import checkpoint_name, write_checkpoint
from pipeline.config import Settings
from pipeline.data.errors import NotFoundError, StorageUnreachableError
from pipeline.data.storage import is_outage, ride_out
from pipeline.train.run_storage import RunStorage


def test_ride_out_retries_an_outage_and_gives_up_after_the_window(capsys):
    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionRefusedError("connection refused")
        return "ok"

    assert ride_out("reading x", flaky, {"outage_s": 30}) == "ok" and len(calls) == 3
    assert "waiting for" in capsys.readouterr().err
    t0 = time.monotonic()
    with pytest.raises(StorageUnreachableError, match=r"unreachable for \d+ s while reading y \(storage.outage_s=1\)"):
        ride_out("reading y", lambda: (_ for _ in ()).throw(ConnectionResetError("reset")), {"outage_s": 1})
    assert 0.9 < time.monotonic() - t0 < 3


def test_errors_that_are_not_outages_raise_at_once():
    with pytest.raises(NotFoundError):
        ride_out("reading z", lambda: (_ for _ in ()).throw(NotFoundError("not found: z")), {"outage_s": 60})
    assert is_outage(OSError("AWS Error NETWORK_CONNECTION during ListObjectsV2 operation: curlCode: 7"))
    assert not is_outage(OSError("Path does not exist"))


def test_retention_keeps_the_newest_usable_checkpoints(tmp_path):
    settings = Settings(storage={"checkpoint_url": str(tmp_path / "runs")})
    run = RunStorage(settings, "r", tmp_path / "cache")
    src = tmp_path / "src"
    written = []
    for images, gen in [(100, 0), (200, 0), (300, 0), (200, 1)]:
        name = checkpoint_name(images, gen)
        write_checkpoint({"x": images}, src / name)
        written.append(run.upload(src / name, name))
    assert [p.rsplit("/", 1)[1] for p in run.candidates()] == [
        checkpoint_name(200, 1),
        checkpoint_name(300),
        checkpoint_name(200),
        checkpoint_name(100),
    ]
    run.mark_unusable(written[2])  # images 300, generation 0: restore skipped it
    deleted = run.retain(2, written[3])
    assert sorted(deleted) == sorted([written[0], written[2]])
    assert run.candidates() == [written[3], written[1]]
    assert run.fetch(written[3]).joinpath("meta.json").is_file()
    run.close()
    assert not run.cache.exists()
