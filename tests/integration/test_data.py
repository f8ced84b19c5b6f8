"""The streaming shard reader (pipeline/data) against the real local stack's S3 (no mocks): exact
epochs over ranks x DataLoader workers, resume across epochs, bad shards, clear storage errors. The
same reader on local datasets, and the plan's maths, are tested in tests/unit/data."""

from __future__ import annotations

import collections
import io
import json
import random
import tarfile
import uuid
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
)
from pipeline.data.storage import delete_urls, join_url, read_bytes, write_bytes
from tests.unit.data.datasets import UNEVEN, expected_image, read_epoch, same_batches, write_dataset

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def uneven(s3):
    """Digits on S3 in deliberately uneven shards."""
    root = join_url(s3.root, "uneven")
    manifest, truth = write_dataset(root, s3.storage, UNEVEN)
    return SimpleNamespace(root=root, manifest=manifest, truth=truth)


# ------------------------------------------------------------------------------------------------
# S3: exactly once, equal batch counts, resume


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


def test_zero_workers_and_no_shuffle(s3, uneven):
    data = DataConfig(url=uneven.root, loader_workers=0, shuffle_buffer=0)
    ranks = read_epoch(data, s3.storage, world_size=2, batch_size=100, epoch=0)
    keys = [k for _, batches in ranks for b in batches for k in b.keys]
    assert sorted(keys) == sorted(uneven.truth) and len(ranks[0][1]) == len(ranks[1][1])
    # no shuffle buffer: a rank's stream reads its shards in order
    reader, batches = ranks[0]
    sp = reader.plan(0).rank_streams(0)[0]
    first_shard = read_bytes(uneven.manifest.shard_url(sp.shards[0]), s3.storage)
    with tarfile.open(fileobj=io.BytesIO(first_shard)) as tf:
        first_key = tf.getnames()[0].split(".")[0]
    assert batches[0].keys[0] == first_key


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

    unreachable = s3.storage.model_copy(update={"endpoint_url": "http://127.0.0.1:9", "outage_s": 2.0})
    with pytest.raises(StorageUnreachableError, match="127.0.0.1:9"):
        open_manifest(uneven.root, unreachable, "train")


def test_manifest_mismatch_names_both_values(s3, uneven):
    with pytest.raises(DatasetMismatchError) as e:
        ShardReader(DataConfig(url=uneven.root, image_size=32, resize="never"), s3.storage, batch_size=8)
    assert "has 8" in str(e.value) and "is 32" in str(e.value) and "image_size" in str(e.value)
    with pytest.raises(DatasetMismatchError) as e:
        ShardReader(DataConfig(url=uneven.root, channels=3, resize="never"), s3.storage, batch_size=8)
    assert "has 1" in str(e.value) and "is 3" in str(e.value) and "channels" in str(e.value)


def test_shards_made_elsewhere_are_indexed_in_place_and_trained_on(s3, stack_env, index_reads):
    """img2dataset-layout shards in S3 (plain TarWriter: jpg, txt, json with a label): --index-only writes
    manifests under another prefix from ranged reads of the tar headers (no image byte read), and the
    training loop streams the original shards, resized to 16 px, classes from the JSON field."""
    from jobs import prepare_data
    from tests.unit.data.datasets import assert_no_image_byte_read, train_briefly, write_foreign_shards

    shards, out = join_url(s3.root, "foreign"), join_url(s3.root, "indexed")
    write_foreign_shards(shards, s3.storage, [40, 25, 33, 30, 20])
    argv = ["--source", "webdataset", "--index-only", "--shards", shards + "/{00000..00004}.tar", "--out", out]
    assert prepare_data.main([*argv, "--label-key", "label", "--eval-fraction", "0.2", "--no-progress"]) == 0
    train, ev = open_manifest(out, s3.storage, "train"), open_manifest(out, s3.storage, "eval")
    assert train.num_samples + ev.num_samples == 148 and len(ev.shards) == 1 and train.labels == "json:label"
    assert_no_image_byte_read(index_reads, lambda url: read_bytes(url, s3.storage))

    result, reports = train_briefly(out, s3.storage, "--data.image-size", "16", "--data.channels", "3",
                                    "--data.label-key", "label", "--data.resize", "random")  # fmt: skip
    assert result["images_seen"] >= 96 and result["steps"] >= 6
    assert any("val_loss" in r and np.isfinite(r["val_loss"]) for r in reports)
