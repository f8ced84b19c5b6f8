"""Elastic training without Ray: the real loop (train_worker) in real gloo processes. A checkpoint written
by 2 workers resumed on 1, and one written by 1 resumed on 2, give the same global batches (sample keys,
step by step) as an uninterrupted 2-worker run, every training sample once in the epoch, and the same
weights up to floating-point reduction order. Five multi-process runs (~20 s): marked slow. The elastic
arithmetic without processes is in tests/unit/train/test_elastic.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline.config import Settings

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
BATCH, TOTAL, FIRST = 64, 1728, 704  # ~28 steps, over the epoch boundary (1,617 images = 26 batches)
# Measured here: 2.4e-5 after 28 AdamW steps at lr 1e-3 (fp32; the same samples, noise and steps, summed
# in another order, which AdamW's normalisation amplifies), against weight changes of order 1e-2.
TOLERANCE = 1e-4

WORKER = textwrap.dedent(
    """
    import json, os, shutil, sys
    from pathlib import Path
    import torch, torch.distributed as td
    from pipeline.checkpoint import images_of
    from pipeline.config import Settings
    from pipeline.train import loop
    from pipeline.train.checkpointer import Session

    settings_file, store, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        td.init_process_group("gloo")
    rank = td.get_rank() if td.is_initialized() else 0
    settings = Settings.model_validate(json.loads(Path(settings_file).read_text()))
    steps = open(out / f"steps-{rank}.jsonl", "a")
    inputs = loop.step_inputs

    def recorded(state, batch, **kw):  # the batch every step trains on, as this rank sees it
        steps.write(json.dumps({"step": state.step_count, "epoch": batch.epoch, "index": batch.index,
                                "keys": list(batch.keys), "global_size": batch.global_size}) + "\\n")
        return inputs(state, batch, **kw)

    loop.step_inputs = recorded

    def report(metrics, directory, name):
        if directory is not None:
            shutil.copytree(directory, store / name)

    def candidates():
        return sorted(store.iterdir(), key=lambda p: images_of(p.name), reverse=True)

    kept = []
    init = loop.TrainState.__init__
    loop.TrainState.__init__ = lambda self, *a, **kw: (init(self, *a, **kw), kept.append(self))[0]
    result = loop.train_worker(settings, Session(report=report, candidates=candidates))
    steps.close()
    if rank == 0:
        torch.save({"model": kept[0].model.state_dict(), "ema": kept[0].ema.model.state_dict()}, out / "final.pt")
        (out / "result.json").write_text(json.dumps(result))
    if td.is_initialized():
        td.destroy_process_group()
    """
)


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    from jobs import prepare_data

    out = tmp_path_factory.mktemp("digits")
    assert prepare_data.main(["--out", str(out), "--no-progress"]) == 0
    return out


def _run(tmp: Path, data_url: Path, store: Path, workers: int, total: int, name: str) -> Path:
    """train_worker on ``workers`` gloo processes until ``total`` images; checkpoints in ``store``."""
    settings = Settings.from_cli(
        ["--model.preset", "tiny", "--diffusion.num-timesteps", "100", "--data.url", str(data_url),
         "--data.loader-workers", "0", "--data.shuffle-buffer", "300", "--cluster.num-workers", "1-2",
         "--train.batch-size", str(BATCH), "--train.total-images", str(total),
         "--train.checkpoint-every-images", "640", "--train.sample-every-images", "0",
         "--train.warmup-images", "256", "--train.lr", "1e-3", "--train.log-every-steps", "5"]
    )  # fmt: skip
    settings.tracking.uri = None
    out = tmp / name
    out.mkdir()
    store.mkdir(exist_ok=True)
    (tmp / "settings.json").write_text(settings.model_dump_json())
    (tmp / "worker.py").write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(workers):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(workers), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}  # fmt: skip
        cmd = [sys.executable, str(tmp / "worker.py"), str(tmp / "settings.json"), str(store), str(out)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))  # fmt: skip
    try:
        for p in procs:
            log, _ = p.communicate(timeout=240)
            assert p.returncode == 0, log[-4000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def _global_batches(*outs: Path) -> list[tuple[int, int, int, tuple[str, ...]]]:
    """(step, epoch, index, keys of the global batch) of every step of consecutive runs, ranks joined in
    rank order (rank r reads the partitions before rank r + 1's)."""
    by_step: dict[int, tuple[int, int, list[str]]] = {}
    for out in outs:
        for f in sorted(out.glob("steps-*.jsonl")):
            for rec in map(json.loads, f.read_text().splitlines()):
                by_step.setdefault(rec["step"], (rec["epoch"], rec["index"], []))[2].extend(rec["keys"])
    return [(s, e, i, tuple(keys)) for s, (e, i, keys) in sorted(by_step.items())]


def same_weights_tolerance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two state dicts' float tensors."""
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


def test_resume_across_world_sizes_equals_an_uninterrupted_run(digits_folder, tmp_path):
    full = _run(tmp_path, digits_folder, tmp_path / "store-full", 2, TOTAL, "full")
    two = _run(tmp_path, digits_folder, tmp_path / "store-21", 2, FIRST, "two")
    then_one = _run(tmp_path, digits_folder, tmp_path / "store-21", 1, TOTAL, "then-one")
    one = _run(tmp_path, digits_folder, tmp_path / "store-12", 1, FIRST, "one")
    then_two = _run(tmp_path, digits_folder, tmp_path / "store-12", 2, TOTAL, "then-two")

    reference = _global_batches(full)
    assert [b[0] for b in reference] == list(range(len(reference)))
    assert sum(len(b[3]) for b in reference) == json.loads((full / "result.json").read_text())["images_seen"]
    epoch0 = [k for _, epoch, _, keys in reference if epoch == 0 for k in keys]
    assert len(epoch0) == len(set(epoch0)) == 1617  # every training sample once in the epoch
    assert [b[2] for b in reference if b[1] == 0] == list(range(26))
    for resumed in (_global_batches(two, then_one), _global_batches(one, then_two)):
        assert resumed == reference  # the same samples in the same global batches, step by step

    seen = json.loads((full / "result.json").read_text())["images_seen"]
    assert [json.loads((out / "result.json").read_text())["images_seen"] for out in (then_one, then_two)] == [seen] * 2
    ref = torch.load(full / "final.pt")
    for out in (then_one, then_two):
        got = torch.load(out / "final.pt")
        for part in ("model", "ema"):
            diff = same_weights_tolerance(ref[part], got[part])
            print(f"{out.name} {part}: max |weight difference| = {diff:.2e}")
            assert diff < TOLERANCE
