"""The streaming shard reader (pipeline/data): exact epochs over ranks x workers, equal batch counts,
resume, bad data, clear storage errors. S3 tests run against the real local stack (no mocks)."""

from __future__ import annotations

import collections
import io
import json
import os
import random
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import (
    DatasetMismatchError,
    ManifestError,
    MissingBucketError,
    ShardError,
    ShardReader,
    StorageAuthError,
    StorageUnreachableError,
    load_split_arrays,
    open_manifest,
    plan_epoch,
)
from pipeline.data.sources import digits_source, encode_png, prepare_image
from pipeline.data.storage import delete_urls, join_url, read_bytes, write_bytes
from pipeline.data.writer import SplitWriter

REPO_ROOT = Path(__file__).resolve().parents[2]
UNEVEN = [400, 37, 300, 120, 250, 10, 350, 150]  # 1617 samples in deliberately uneven shards


# ------------------------------------------------------------------------------------------------
# helpers


_DIGITS: list[tuple[str, int, bytes]] = []


def digits_samples() -> list[tuple[str, int, bytes]]:
    """(key, label, png) of all 1,797 digits, in source order (cached)."""
    if not _DIGITS:
        for it in digits_source().items:
            _DIGITS.append((it.key, it.label, encode_png(prepare_image(it.load(), 8, 1))))
    return _DIGITS


def write_dataset(root: str, storage, shard_sizes: list[int], split: str = "train", seed: int = 0):
    """Digits in shards of exactly the given sizes (shuffled with seed); returns (manifest, truth)."""
    samples = digits_samples()[:]
    random.Random(seed).shuffle(samples)
    samples = samples[: sum(shard_sizes)]
    w = SplitWriter(
        join_url(root, split),
        storage,
        split=split,
        image_size=8,
        channels=1,
        class_names=[str(i) for i in range(10)],
        source={"kind": "test"},
        shard_samples=10**9,
        shard_bytes=1 << 40,
    )
    k = 0
    for n in shard_sizes:
        for key, label, png in samples[k : k + n]:
            w.add(key, png, label, {"index": key})
        w.cut()
        k += n
    truth = {key: (label, png) for key, label, png in samples}
    return w.finish(), truth


def expected_image(png: bytes) -> torch.Tensor:
    arr = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    return torch.from_numpy(arr / 127.5 - 1.0)[None]


def read_epoch(data: DataConfig, storage, *, world_size: int, batch_size: int, epoch: int, seed: int = 0):
    """Every rank's batches of one epoch (ranks simulated by separate readers)."""
    out = []
    for rank in range(world_size):
        r = ShardReader(data, storage, rank=rank, world_size=world_size, batch_size=batch_size, seed=seed)
        out.append((r, list(r.iterate(epoch))))
    return out


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        x.index == y.index
        and x.keys == y.keys
        and torch.equal(x.labels, y.labels)
        and torch.equal(x.images, y.images)
        and x.skipped == y.skipped
        for x, y in zip(a, b, strict=True)
    )


@pytest.fixture(scope="module")
def uneven(s3):
    """Digits on S3 in deliberately uneven shards."""
    root = join_url(s3.root, "uneven")
    manifest, truth = write_dataset(root, s3.storage, UNEVEN)
    return SimpleNamespace(root=root, manifest=manifest, truth=truth)


# ------------------------------------------------------------------------------------------------
# the plan (pure; no storage)


@pytest.mark.parametrize("world_size,streams", [(1, 1), (2, 2), (3, 2), (4, 1), (2, 4)])
def test_plan_gives_every_rank_the_same_batches_and_every_sample_once(world_size, streams):
    rng = random.Random(world_size * 10 + streams)
    for trial in range(20):
        counts = [rng.randint(1, 300) for _ in range(rng.randint(world_size * 2, 40))]
        n = sum(counts)
        batch = rng.choice([8, 16, 64])
        B = max(1, -(-n // (world_size * batch)))
        if n - (world_size - 1) * max(counts) < world_size * B:
            continue  # the reader refuses such layouts up front
        plan = plan_epoch(
            counts, world_size=world_size, streams_per_rank=streams, batches_per_epoch=B, seed=1, epoch=trial
        )
        seen = sorted(i for sp in plan.streams for i in sp.shards)
        assert seen == list(range(len(counts)))  # each shard once
        for rank in range(world_size):
            sizes = plan.batch_sizes(rank)
            assert len(sizes) == B and min(sizes) >= 1
            indices = sorted(j for sp in plan.rank_streams(rank) for j in sp.batch_indices)
            assert indices == list(range(B))
            for sp in plan.rank_streams(rank):
                assert sum(sp.batch_sizes) == sp.samples == sum(counts[i] for i in sp.shards)
        assert sum(sum(plan.batch_sizes(r)) for r in range(world_size)) == n
        again = plan_epoch(
            counts, world_size=world_size, streams_per_rank=streams, batches_per_epoch=B, seed=1, epoch=trial
        )
        assert again == plan


def test_plan_changes_with_epoch_and_seed():
    counts = [100] * 16
    kw = dict(world_size=2, streams_per_rank=2, batches_per_epoch=25)
    a = plan_epoch(counts, seed=0, epoch=0, **kw)
    assert a != plan_epoch(counts, seed=0, epoch=1, **kw)
    assert a != plan_epoch(counts, seed=1, epoch=0, **kw)


def test_reader_refuses_too_few_shards(tmp_path):
    manifest, _ = write_dataset(str(tmp_path), None, [300])
    with pytest.raises(Exception, match="too few or too large"):
        ShardReader(DataConfig(url=str(tmp_path)), rank=0, world_size=2, batch_size=16)


# ------------------------------------------------------------------------------------------------
# S3: exactly once, equal batch counts, resume


@pytest.mark.stack
def test_every_image_once_per_epoch_over_two_ranks_and_two_workers(s3, uneven):
    data = DataConfig(url=uneven.root, loader_workers=2, shuffle_buffer=100)
    expected = {k: expected_image(png) for k, (_, png) in uneven.truth.items()}
    orders = []
    for epoch in (0, 1):
        ranks = read_epoch(data, s3.storage, world_size=2, batch_size=64, epoch=epoch)
        B = ranks[0][0].batches_per_epoch
        assert B == -(-1617 // 128) == ranks[1][0].batches_per_epoch
        seen = collections.Counter()
        for reader, batches in ranks:
            assert [b.index for b in batches] == list(range(B))  # same count on both ranks, in order
            assert all(b.epoch == epoch and b.skipped == 0 and b.refilled == 0 for b in batches)
            assert [len(b) for b in batches] == reader.plan(epoch).batch_sizes(reader.rank)
            for b in batches:
                assert b.images.dtype == torch.float32 and b.images.shape[1:] == (1, 8, 8)
                assert b.images.min() >= -1 and b.images.max() <= 1
                for key, label, img in zip(b.keys, b.labels.tolist(), b.images, strict=True):
                    seen[key] += 1
                    assert label == uneven.truth[key][0]
                    assert torch.allclose(img, expected[key], atol=1e-6)
        assert seen.keys() == uneven.truth.keys() and set(seen.values()) == {1}
        assert sum(seen.values()) == uneven.manifest.num_samples
        orders.append([k for _, batches in ranks for b in batches for k in b.keys])
    assert orders[0] != orders[1]  # a new order each epoch


@pytest.mark.stack
def test_resume_equals_the_tail_of_an_uninterrupted_pass(s3, uneven):
    data = DataConfig(url=uneven.root, loader_workers=2, shuffle_buffer=200, hflip=True)
    reader = ShardReader(data, s3.storage, rank=1, world_size=2, batch_size=48, seed=7)
    B = reader.batches_per_epoch
    full = list(reader.iterate(3))
    assert reader.position == (4, 0)
    assert same_batches(full, list(reader.iterate(3)))  # deterministic
    for start in (5, B - 1):
        assert same_batches(full[start:], list(reader.iterate(3, start)))
    assert list(reader.iterate(3, B)) == []

    # position -> state_dict -> a new reader (a restarted worker) continues the stream
    first = ShardReader(data, s3.storage, rank=1, world_size=2, batch_size=48, seed=7)
    first.load_state_dict({"epoch": 3, "batch": 0, "layout": first.layout()})
    stream = first.stream()
    head = [next(stream) for _ in range(4)]
    state = first.state_dict()
    stream.close()
    assert (state["epoch"], state["batch"]) == (3, 4) and same_batches(head, full[:4])
    second = ShardReader(data, s3.storage, rank=1, world_size=2, batch_size=48, seed=7)
    second.load_state_dict(json.loads(json.dumps(state)))
    rest = list(second.iterate(*second.position))
    assert same_batches(rest, full[4:])

    # flips are seeded and real: the same images as without flips, some mirrored
    plain = ShardReader(
        data.model_copy(update={"hflip": False}), s3.storage, rank=1, world_size=2, batch_size=48, seed=7
    )
    flipped = mirrored = 0
    for a, b in zip(full, plain.iterate(3), strict=True):
        assert a.keys == b.keys
        for x, y in zip(a.images, b.images, strict=True):
            if torch.equal(x, y.flip(-1)) and not torch.equal(x, y):
                flipped += 1
            elif torch.equal(x, y):
                mirrored += 1
    assert flipped > 100 and mirrored > 100

    # stream() crosses epoch boundaries (the next epoch's workers start early) without changing a batch
    nxt = list(reader.iterate(4))
    third = ShardReader(data, s3.storage, rank=1, world_size=2, batch_size=48, seed=7)
    third.load_state_dict({"epoch": 3, "batch": B - 3})
    stream = third.stream()
    crossed = [next(stream) for _ in range(3 + B + 1)]
    stream.close()
    assert same_batches(crossed, full[B - 3 :] + nxt + list(reader.iterate(5))[:1])
    assert third.position == (5, 1)

    changed = ShardReader(data, s3.storage, rank=1, world_size=2, batch_size=32, seed=7)
    with pytest.raises(ValueError, match="batch_size"):
        changed.load_state_dict(state)


@pytest.mark.stack
def test_zero_workers_and_no_shuffle(s3, uneven):
    data = DataConfig(url=uneven.root, loader_workers=0, shuffle_buffer=0)
    ranks = read_epoch(data, s3.storage, world_size=2, batch_size=100, epoch=0)
    keys = [k for _, batches in ranks for b in batches for k in b.keys]
    assert sorted(keys) == sorted(uneven.truth) and len(ranks[0][1]) == len(ranks[1][1])
    # no shuffle buffer: a rank's stream reads its shards in order
    reader, batches = ranks[0]
    sp = reader.plan(0).rank_streams(0)[0]
    first_shard = read_bytes(uneven.manifest.shard_url(sp.shards[0]), s3.storage)
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(first_shard)) as tf:
        first_key = tf.getnames()[0].split(".")[0]
    assert batches[0].keys[0] == first_key


@pytest.mark.stack
def test_load_split_arrays(s3, uneven):
    arrays = load_split_arrays(uneven.root, s3.storage, "train")
    assert arrays.images.shape == (1617, 8, 8, 1) and arrays.images.dtype == np.uint8
    assert sorted(arrays.keys) == sorted(uneven.truth)
    for i in (0, 500, 1616):
        label, png = uneven.truth[arrays.keys[i]]
        assert arrays.labels[i] == label
        assert np.array_equal(arrays.images[i, :, :, 0], np.asarray(Image.open(io.BytesIO(png))))


# ------------------------------------------------------------------------------------------------
# bad data


def _corrupt(kind: str, shard: bytes) -> bytes | None:
    if kind == "truncated":
        return shard[: len(shard) * 6 // 10 + 77]  # mid-member: the tar reader fails there
    if kind == "garbage":
        return random.Random(0).randbytes(len(shard))
    if kind == "missing":
        return None
    if kind == "badpng":  # one sample's png replaced by bytes that are not an image
        import tarfile

        out = io.BytesIO()
        with (
            tarfile.open(fileobj=io.BytesIO(shard)) as src,
            tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst,
        ):
            for i, ti in enumerate(src.getmembers()):
                data = src.extractfile(ti).read()
                if i == 5 and ti.name.endswith(".png"):
                    data = b"\x89PNG this is not an image"
                    ti.size = len(data)
                dst.addfile(ti, io.BytesIO(data))
        return out.getvalue()
    raise ValueError(kind)


@pytest.fixture(scope="module")
def bad_datasets(s3):
    """One dataset per kind of damage, each with its shard 1 (of 5) damaged."""
    out = {}
    for kind in ("truncated", "garbage", "missing", "badpng"):
        root = join_url(s3.root, f"bad-{kind}")
        manifest, truth = write_dataset(root, s3.storage, [100, 100, 100, 100, 100], seed=3)
        url = manifest.shard_url(1)
        damaged = _corrupt(kind, read_bytes(url, s3.storage))
        if damaged is None:
            delete_urls([url], s3.storage)
        else:
            write_bytes(url, damaged, s3.storage)
        out[kind] = SimpleNamespace(root=root, manifest=manifest, truth=truth, bad_url=url)
    return out


@pytest.mark.stack
@pytest.mark.parametrize("kind", ["truncated", "garbage", "missing", "badpng"])
def test_bad_shards_are_skipped_counted_and_strict_raises(s3, bad_datasets, kind):
    ds = bad_datasets[kind]
    data = DataConfig(url=ds.root, loader_workers=2, shuffle_buffer=50)
    ranks = read_epoch(data, s3.storage, world_size=2, batch_size=32, epoch=0)
    B = ranks[0][0].batches_per_epoch
    skipped = refilled = 0
    unique: set[str] = set()
    messages = []
    for reader, batches in ranks:
        assert [b.index for b in batches] == list(range(B))  # never fewer batches
        assert [len(b) for b in batches] == reader.plan(0).batch_sizes(reader.rank)  # refilled to plan
        for b in batches:
            skipped += b.skipped
            refilled += b.refilled
            unique.update(b.keys)
            messages += b.errors
            assert all(ds.truth[k][0] == label for k, label in zip(b.keys, b.labels.tolist(), strict=True))
    assert skipped >= 1 and refilled == skipped
    assert len(unique) + skipped == 500  # every readable image once, every lost one counted
    if kind in ("garbage", "missing"):
        assert skipped == 100
    if kind == "badpng":
        assert skipped == 1
    assert any(ds.bad_url in m for m in messages)

    strict = data.model_copy(update={"strict": True, "loader_workers": 0})
    for rank in (0, 1):
        reader = ShardReader(strict, s3.storage, rank=rank, world_size=2, batch_size=32)
        if 1 in reader.plan(0).shards_of(rank):
            with pytest.raises(ShardError) as e:
                list(reader.iterate(0))
            assert ds.bad_url in str(e.value)


@pytest.mark.stack
def test_strict_error_crosses_dataloader_workers(s3, bad_datasets):
    ds = bad_datasets["missing"]
    data = DataConfig(url=ds.root, loader_workers=2, strict=True)
    for rank in (0, 1):
        reader = ShardReader(data, s3.storage, rank=rank, world_size=2, batch_size=32)
        if 1 in reader.plan(0).shards_of(rank):
            with pytest.raises(ShardError, match=ds.bad_url):
                list(reader.iterate(0))


# ------------------------------------------------------------------------------------------------
# clear errors


@pytest.mark.stack
def test_storage_errors_are_clear(s3, uneven):
    endpoint = s3.storage.endpoint_url
    data = DataConfig(url=uneven.root)
    wrong_key = s3.storage.model_copy(update={"access_key_id": "NOSUCHKEY123"})
    with pytest.raises(StorageAuthError) as e:
        ShardReader(data, wrong_key, batch_size=8)
    assert endpoint in str(e.value) and "refused the access keys" in str(e.value)
    assert "InvalidAccessKeyId" in str(e.value)

    from pydantic import SecretStr

    wrong_secret = s3.storage.model_copy(update={"secret_access_key": SecretStr("wrong-secret")})
    with pytest.raises(StorageAuthError, match="SignatureDoesNotMatch") as e:
        ShardReader(data, wrong_secret, batch_size=8)
    assert endpoint in str(e.value) and "refused the access keys" in str(e.value)

    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    with pytest.raises(MissingBucketError, match=bucket):
        ShardReader(DataConfig(url=f"s3://{bucket}/digits"), s3.storage, batch_size=8)

    empty = join_url(s3.root, "nothing-here")
    with pytest.raises(ManifestError) as e:
        ShardReader(DataConfig(url=empty), s3.storage, batch_size=8)
    assert f"{empty}/train/manifest.json" in str(e.value) and "jobs/prepare_data.py" in str(e.value)

    unreachable = s3.storage.model_copy(update={"endpoint_url": "http://127.0.0.1:9"})
    with pytest.raises(StorageUnreachableError, match="127.0.0.1:9"):
        open_manifest(uneven.root, unreachable, "train")


@pytest.mark.stack
def test_manifest_mismatch_names_both_values(s3, uneven):
    with pytest.raises(DatasetMismatchError) as e:
        ShardReader(DataConfig(url=uneven.root, image_size=32), s3.storage, batch_size=8)
    assert "has 8" in str(e.value) and "is 32" in str(e.value) and "image_size" in str(e.value)
    with pytest.raises(DatasetMismatchError) as e:
        ShardReader(DataConfig(url=uneven.root, channels=3), s3.storage, batch_size=8)
    assert "has 1" in str(e.value) and "is 3" in str(e.value) and "channels" in str(e.value)


def test_incomplete_dataset_is_not_read(tmp_path):
    write_dataset(str(tmp_path), None, [50, 50])
    (tmp_path / "train" / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="no manifest"):
        ShardReader(DataConfig(url=str(tmp_path)), batch_size=8)


def test_decoders_never_unpickle(tmp_path):
    """Members other than the image and cls are never decoded (a .pyd would be unpickled by wds)."""
    import pickle
    import tarfile

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    manifest, _ = write_dataset(str(tmp_path), None, [20, 20])
    shard = tmp_path / "train" / manifest.shards[0].name
    members = []
    with tarfile.open(shard) as tf:
        for ti in tf.getmembers():
            members.append((ti, tf.extractfile(ti).read()))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data))
            if ti.name.endswith(".png"):
                evil = pickle.dumps(Boom())
                for ext in ("pyd", "pth"):
                    e = tarfile.TarInfo(ti.name.rsplit(".", 1)[0] + "." + ext)
                    e.size = len(evil)
                    tf.addfile(e, io.BytesIO(evil))
    reader = ShardReader(DataConfig(url=f"file://{tmp_path}", loader_workers=0), batch_size=8)
    n = sum(len(b) for b in reader.iterate(0))
    assert n == 40 and not (tmp_path / "pwned").exists()


def test_data_package_imports_without_ray_and_mlflow():
    code = (
        "import sys, pipeline.data, pipeline.data.reader, pipeline.data.writer, pipeline.data.sources;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)


# ------------------------------------------------------------------------------------------------
# real DDP (gloo, 2 processes x 2 DataLoader workers) on uneven shards with a missing one: no hang


DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {repo!r})
    import torch, torch.distributed as dist
    from pipeline.config import DataConfig
    from pipeline.data import ShardReader
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    reader = ShardReader(DataConfig(url={url!r}, loader_workers=2), rank=rank, world_size=world, batch_size=64)
    steps = images = skipped = 0
    for epoch in range(2):
        for batch in reader.iterate(epoch):
            t = torch.tensor([float(len(batch))])
            dist.all_reduce(t)  # a collective per batch: hangs if one rank yields fewer batches
            steps += 1
            images += len(batch)
            skipped += batch.skipped
    dist.barrier()
    print(json.dumps({{"rank": rank, "steps": steps, "images": images, "skipped": skipped}}))
    dist.destroy_process_group()
    """
)


def test_ddp_gloo_uneven_shards_with_a_missing_one_does_not_hang(tmp_path):
    manifest, _ = write_dataset(str(tmp_path / "ds"), None, UNEVEN)
    (tmp_path / "ds" / "train" / manifest.shards[3].name).unlink()  # 120 samples gone
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO_ROOT), url=str(tmp_path / "ds")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=150)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    B = -(-1617 // 128)
    assert [r["steps"] for r in results] == [2 * B, 2 * B]
    assert sum(r["images"] for r in results) == 2 * 1617  # refilled to the plan
    assert sum(r["skipped"] for r in results) == 2 * 120
