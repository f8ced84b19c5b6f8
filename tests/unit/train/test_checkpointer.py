"""Checkpointer: save and restore a whole TrainState, fall back past corrupt checkpoints, reseed a
generator saved on another kind of device."""

import hashlib
import io
import json
import random
import shutil

import pytest
import torch

from pipeline.checkpoint import checkpoint_name, images_of, parse_name, read_checkpoint, write_checkpoint
from pipeline.train.checkpointer import Checkpointer, Session
from pipeline.train.failures import NotRetryable
from tests.unit.train.helpers import Position, batch, tiny_state


def _copy_to(store):
    def report(metrics, directory, name):
        if directory is not None:
            shutil.copytree(directory, store / name)

    return report


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    s = tiny_state()
    dirs = []
    for i in range(2):
        s.train_step([batch(i)])
        s.images_seen += 16
        full = s.state_dict() | {
            "reader": {"epoch": 0, "batch": i + 1},
            "rng_per_rank": [{"generator": s.generator.get_state(), "torch": torch.get_rng_state()}],
        }
        dirs.append(write_checkpoint(full, tmp_path / checkpoint_name(s.images_seen)))
    # A checkpoint whose file was cut short, and one whose meta.json was never written.
    data = (dirs[1] / "checkpoint.pt").read_bytes()
    (dirs[1] / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    unfinished = tmp_path / checkpoint_name(999)
    unfinished.mkdir()
    (unfinished / "checkpoint.pt").write_bytes(data)
    fresh, pos = tiny_state(seed=5), Position()
    session = Session(report=lambda *a: None, candidates=lambda: [unfinished, dirs[1], dirs[0]])
    assert Checkpointer(fresh, pos, session).restore() == str(dirs[0])
    assert fresh.images_seen == 16 and pos.state["batch"] == 1
    assert Checkpointer(tiny_state(), Position(), Session(report=lambda *a: None)).restore() is None


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("skip_on_host", [None, False])
@pytest.mark.parametrize("device", DEVICES)
def test_save_then_restore_continues_identically(tmp_path, device, skip_on_host):
    """On the model's device (random states stay CPU tensors), with the step skipped on the host or
    masked on the device (device counters are saved as plain values)."""
    report = _copy_to(tmp_path)
    a = tiny_state(0, device=device, skip_on_host=skip_on_host)
    for i in range(3):
        a.train_step([batch(i)])
        a.images_seen += 16
    a.samples_skipped = 7
    Checkpointer(a, Position(), Session(report=report)).save()
    b, pos = tiny_state(5, device=device, skip_on_host=skip_on_host), Position()
    session = Session(report=report, candidates=lambda: sorted(tmp_path.iterdir()))
    assert Checkpointer(b, pos, session).restore() is not None
    assert b.samples_skipped == 7 and b.images_seen == 48 and b.step_count == 3
    assert torch.equal(b.generator.get_state(), a.generator.get_state())
    ra, rb = a.train_step([batch(3)]), b.train_step([batch(3)])
    assert ra.loss_sum == pytest.approx(rb.loss_sum, rel=1e-5)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert q.device == p.device and torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    full, _ = read_checkpoint(next(tmp_path.iterdir()))
    assert full["counters"] == {"images_seen": 48, "step": 3, "skipped_steps": 0, "samples_skipped": 7}


def test_a_noise_generator_state_from_another_device_is_reseeded(tmp_path, capsys):
    """A run saved on a GPU (16-byte CUDA generator state) resumes on a CPU worker, and vice versa."""
    report = _copy_to(tmp_path)
    a = tiny_state()
    a.train_step([batch(0)])
    a.images_seen += 16
    Checkpointer(a, Position(), Session(report=report)).save()
    (ckpt,) = tmp_path.iterdir()
    full, _ = read_checkpoint(ckpt)
    full["rng_per_rank"][0]["generator"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's size
    shutil.rmtree(ckpt)
    write_checkpoint(full, ckpt)
    states = []
    for _ in range(2):
        b = tiny_state(seed=5)
        Checkpointer(b, Position(), Session(report=report, candidates=lambda: [ckpt])).restore()
        states.append(b.generator.get_state())
    assert "reseeded from the counters" in capsys.readouterr().out
    assert torch.equal(states[0], states[1]) and not torch.equal(states[0], tiny_state(seed=5).generator.get_state())


def _saved(tmp_path, steps: int):
    """A state trained ``steps`` steps with a checkpoint after each; (state, checkpoint dirs oldest first)."""
    s, dirs = tiny_state(), []
    for i in range(steps):
        s.train_step([batch(i)])
        s.images_seen += 16
        Checkpointer(s, Position(), Session(report=_copy_to(tmp_path))).save()
        dirs.append(tmp_path / checkpoint_name(s.images_seen))
    return s, dirs


def _replace_payload(directory, data: bytes) -> None:
    """The file replaced and meta.json rewritten to match it: only loading can tell it is unusable."""
    meta = json.loads((directory / "meta.json").read_text())
    (directory / "checkpoint.pt").write_bytes(data)
    meta |= {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (directory / "meta.json").write_text(json.dumps(meta))


class _Planted:
    def __reduce__(self):  # what an attacker's pickle would run at load time
        return (print, ("planted code ran",))


def _pickle_payload() -> bytes:
    buf = io.BytesIO()
    torch.save({"model": _Planted()}, buf)
    return buf.getvalue()


def _other_shapes(directory) -> None:
    full, _ = read_checkpoint(directory)
    key = next(k for k, v in full["model"].items() if v.ndim == 4)
    full["model"][key] = torch.zeros(3, 3, 3, 3)
    _rewrite(directory, full)


def _missing_key(directory) -> None:
    full, _ = read_checkpoint(directory)
    full["model"].pop(next(iter(full["model"])))
    _rewrite(directory, full)


def _rewrite(directory, full) -> None:
    buf = io.BytesIO()
    torch.save(full, buf)
    _replace_payload(directory, buf.getvalue())


UNUSABLE = {
    "pickle": lambda d: _replace_payload(d, _pickle_payload()),
    "random bytes": lambda d: _replace_payload(d, bytes(random.Random(0).getrandbits(8) for _ in range(4096))),
    "not a dict": lambda d: _rewrite(d, [torch.zeros(2)]),
    "shape mismatch": _other_shapes,
    "missing key": _missing_key,
    "flipped byte": lambda d: (d / "checkpoint.pt").write_bytes(
        (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:])((d / "checkpoint.pt").read_bytes())
    ),
}


@pytest.mark.parametrize("kind", list(UNUSABLE))
def test_an_unusable_newest_checkpoint_is_skipped_and_the_run_writes_new_names(tmp_path, capsys, kind):
    _, dirs = _saved(tmp_path, 3)
    UNUSABLE[kind](dirs[2])
    good, _ = read_checkpoint(dirs[1])
    b, flagged = tiny_state(seed=5), []
    session = Session(report=_copy_to(tmp_path), candidates=lambda: dirs[::-1], unusable=lambda c: flagged.append(c))
    ck = Checkpointer(b, Position(), session)
    assert ck.restore() == str(dirs[1])
    out = capsys.readouterr().out
    assert "planted code ran" not in out and f"unusable checkpoint {dirs[2]}" in out
    assert flagged == [dirs[2]] and b.images_seen == 32
    for k, v in good["model"].items():  # the failed load left nothing behind
        assert torch.equal(b.model.state_dict()[k], v)
    b.train_step([batch(9)])
    b.images_seen += 16
    ck.save()  # at 48 images again: a new generation's name, never the unusable one's
    assert (tmp_path / checkpoint_name(48, 1)).is_dir() and ck.generation == 1


def test_a_run_whose_checkpoints_all_fail_to_load_fails_without_retry(tmp_path):
    _, dirs = _saved(tmp_path, 2)
    for d in dirs:
        _replace_payload(d, _pickle_payload())
    b = tiny_state(seed=5)
    before = {k: v.clone() for k, v in b.model.state_dict().items()}
    with pytest.raises(NotRetryable, match="none of the run's 2 checkpoint"):
        Checkpointer(b, Position(), Session(report=lambda *a: None, candidates=lambda: dirs[::-1])).restore()
    assert all(torch.equal(b.model.state_dict()[k], v) for k, v in before.items())


def test_names_order_by_generation_then_images():
    names = [checkpoint_name(300), checkpoint_name(100, 1), checkpoint_name(200, 1), "images_5.pt", "other"]
    assert sorted((n for n in names if parse_name(n)), key=parse_name) == [
        "images_5.pt",
        checkpoint_name(300),
        checkpoint_name(100, 1),
        checkpoint_name(200, 1),
    ]
    assert images_of(checkpoint_name(200, 1)) == 200 and images_of(checkpoint_name(7) + ".pt") == 7
