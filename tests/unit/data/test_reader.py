"""The shard reader (pipeline.data.reader) on local datasets: exact epochs, equal batch counts per
rank, resume, the loader-worker count (no stack). Real DDP over gloo processes is
tests/integration/test_reader_gloo.py (slow)."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data import ManifestError, ShardReader
from tests.unit.data.datasets import UNEVEN, expected_image, read_epoch, same_batches, write_dataset

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Digits in a local directory, in deliberately uneven shards: (root, truth)."""
    root = tmp_path_factory.mktemp("uneven")
    _, truth = write_dataset(str(root), None, UNEVEN)
    return str(root), truth


def test_reader_refuses_too_few_shards(tmp_path):
    write_dataset(str(tmp_path), None, [300])
    with pytest.raises(Exception, match="number of data partitions"):
        ShardReader(DataConfig(url=str(tmp_path)), rank=0, world_size=2, batch_size=32)


def test_incomplete_dataset_is_not_read(tmp_path):
    write_dataset(str(tmp_path), None, [50, 50])
    (tmp_path / "train" / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="no manifest"):
        ShardReader(DataConfig(url=str(tmp_path)), batch_size=8)


def test_loader_workers_resolved_once_for_the_device(uneven):
    root, _ = uneven
    auto = DataConfig(url=root)
    assert ShardReader(auto, batch_size=64).loader_workers == 0  # device="cpu" by default
    cuda = ShardReader(auto, batch_size=64, device="cuda")  # builds no DataLoader: no GPU needed
    assert cuda.loader_workers == 2 and "loader_workers" not in cuda.layout()
    fixed = DataConfig(url=root, loader_workers=3)
    assert [ShardReader(fixed, batch_size=64, device=d).loader_workers for d in ("cpu", "cuda")] == [3, 3]


def test_every_image_once_per_epoch_in_process(uneven):
    root, truth = uneven
    data = DataConfig(url=root, loader_workers=0, shuffle_buffer=100)
    orders = []
    for epoch in (0, 1):
        ranks = read_epoch(data, None, world_size=2, batch_size=64, epoch=epoch)
        B = ranks[0][0].batches_per_epoch
        assert B == -(-1617 // 128) == ranks[1][0].batches_per_epoch
        seen = collections.Counter()
        for reader, batches in ranks:
            assert [b.index for b in batches] == list(range(B))
            assert [len(b) for b in batches] == reader.plan(epoch).batch_sizes(reader.rank)
            for b in batches:
                for key, label, img in zip(b.keys, b.labels.tolist(), b.images, strict=True):
                    seen[key] += 1
                    assert label == truth[key][0] and torch.allclose(img, expected_image(truth[key][1]), atol=1e-6)
        assert seen.keys() == truth.keys() and set(seen.values()) == {1}
        orders.append([k for _, batches in ranks for b in batches for k in b.keys])
    assert orders[0] != orders[1]


def test_resume_in_process_equals_the_tail_of_an_uninterrupted_pass(uneven):
    root, _ = uneven
    data = DataConfig(url=root, loader_workers=0, shuffle_buffer=200, hflip=True)
    reader = ShardReader(data, rank=0, world_size=2, batch_size=96, seed=7)
    full = list(reader.iterate(1))
    assert reader.position == (2, 0)

    first = ShardReader(data, rank=0, world_size=2, batch_size=96, seed=7)
    first.load_state_dict({"epoch": 1, "batch": 0, "layout": first.layout()})
    stream = first.stream()
    head = [next(stream) for _ in range(5)]
    state = first.state_dict()
    stream.close()
    assert (state["epoch"], state["batch"]) == (1, 5) and same_batches(head, full[:5])
    second = ShardReader(data, rank=0, world_size=2, batch_size=96, seed=7)
    second.load_state_dict(json.loads(json.dumps(state)))
    assert same_batches(list(second.iterate(*second.position)), full[5:])

    other = ShardReader(data.model_copy(update={"partitions": 2}), rank=0, world_size=2, batch_size=96, seed=7)
    with pytest.raises(ValueError, match="partitions"):
        other.load_state_dict(state)  # another layout: the stream cannot be continued exactly


def test_global_batches_equal_on_any_world_size_and_loader_workers(uneven):
    """The samples, images and order of every global batch are the same on 1, 2, 3 or 4 ranks, with or
    without DataLoader workers; a position saved on 2 ranks continues exactly on 1 and on 4."""
    root, _ = uneven
    data = DataConfig(url=root, loader_workers=0, shuffle_buffer=200, hflip=True)

    def global_batches(world, workers=0, position=None):
        ranks = []
        for rank in range(world):
            cfg = data.model_copy(update={"loader_workers": workers})
            r = ShardReader(cfg, rank=rank, world_size=world, batch_size=128, seed=3)
            if position:
                r.load_state_dict(position)
            ranks.append(list(r.iterate(*r.position)))
        out = []
        for pieces in zip(*ranks, strict=True):
            assert len({(b.index, b.global_size) for b in pieces}) == 1
            out.append(
                (
                    pieces[0].index,
                    tuple(k for b in pieces for k in b.keys),
                    torch.cat([b.images for b in pieces]),
                    tuple(p for b in pieces for p in b.parts),
                )
            )
        return out

    one = global_batches(1)
    assert [b[3] for b in one] == [(0, 1, 2, 3)] * len(one)
    for other in (global_batches(2), global_batches(3), global_batches(4, workers=2)):
        assert [(i, k, p) for i, k, _, p in other] == [(i, k, p) for i, k, _, p in one]
        assert all(torch.equal(a[2], b[2]) for a, b in zip(other, one, strict=True))
    saved = ShardReader(data, rank=1, world_size=2, batch_size=128, seed=3)
    saved.load_state_dict({"epoch": 0, "batch": 5, "layout": saved.layout()})
    state = json.loads(json.dumps(saved.state_dict()))
    for world in (1, 4):
        tail = global_batches(world, position=state)
        assert [(i, k) for i, k, _, _ in tail] == [(i, k) for i, k, _, _ in one[5:]]


def test_data_package_imports_without_ray_and_mlflow():
    modules = "pipeline.data, pipeline.data.plan, pipeline.data.shards, pipeline.data.reader, pipeline.data.prepare"
    code = (
        f"import sys, {modules}, pipeline.data.writer, pipeline.data.sources;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)
