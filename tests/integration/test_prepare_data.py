"""jobs/prepare_data.py against the real local stack's S3: the digits default and image folders ->
WebDataset shards + manifests; standard tar layout; refusal / --overwrite; storage errors. The job's
command line and local-directory output are tested in tests/unit/data/test_prepare.py."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import subprocess
import tarfile
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import ShardReader, load_split_arrays, open_manifest, register_webdataset_s3
from pipeline.data.sources import digits_source
from pipeline.data.storage import join_url, list_urls, read_bytes
from tests.unit.data.datasets import run_prepare_data, save_image

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def digits_s3(s3):
    """The default job (digits) run through its real command line into S3."""
    out = join_url(s3.root, "digits")
    p = run_prepare_data("--out", out, "--shard-samples", "200", "--no-progress", env=s3.env)
    assert p.returncode == 0, p.stderr
    return SimpleNamespace(out=out, stdout=p.stdout, stderr=p.stderr)


# ------------------------------------------------------------------------------------------------
# digits on S3


def test_digits_job_writes_shards_and_manifests_to_s3(s3, digits_s3):
    train = open_manifest(digits_s3.out, s3.storage, "train")
    evals = open_manifest(digits_s3.out, s3.storage, "eval")
    assert (train.num_samples, evals.num_samples) == (1617, 180)
    assert train.image_size == 8 and train.channels == 1 and train.class_names == [str(i) for i in range(10)]
    assert sum(train.class_counts) == 1617 and all(c > 100 for c in train.class_counts)
    assert [s.samples for s in train.shards] == [200] * 8 + [17]
    assert train.source["kind"] == "digits" and train.created and train.format_version == 2
    for s in train.shards:
        data = read_bytes(join_url(digits_s3.out, "train", s.name), s3.storage)
        assert len(data) == s.bytes and hashlib.sha256(data).hexdigest() == s.sha256
        assert s.url == join_url(digits_s3.out, "train", s.name)
    objects = sorted(u.rsplit("/", 1)[-1] for u in list_urls(join_url(digits_s3.out, "train"), s3.storage))
    assert objects == sorted([s.name for s in train.shards] + ["manifest.json"])
    assert "train: 1617 images in 9 shard(s)" in digits_s3.stdout

    tr = load_split_arrays(digits_s3.out, s3.storage, "train")
    ev = load_split_arrays(digits_s3.out, s3.storage, "eval")
    assert set(tr.keys).isdisjoint(ev.keys) and len(set(tr.keys) | set(ev.keys)) == 1797
    src = {it.key: it for it in digits_source().items}
    for arrays in (tr, ev):
        for i in range(0, len(arrays.keys), 97):
            it = src[arrays.keys[i]]
            assert arrays.labels[i] == it.label
            assert np.array_equal(arrays.images[i, :, :, 0], np.asarray(it.load()))


def test_shards_have_the_standard_layout(s3, digits_s3, tmp_path):
    m = open_manifest(digits_s3.out, s3.storage, "eval")
    local = tmp_path / m.shards[0].name
    local.write_bytes(read_bytes(m.shard_url(0), s3.storage))
    names = subprocess.run(["tar", "tf", str(local)], capture_output=True, text=True, check=True).stdout.split()
    assert len(names) == 3 * 180
    by_key = collections.defaultdict(set)
    for n in names:
        key, ext = n.split(".", 1)
        by_key[key].add(ext)
    assert all(exts == {"png", "cls", "json"} for exts in by_key.values()) and len(by_key) == 180
    with tarfile.open(local) as tf:
        key = names[0].split(".")[0]
        cls = int(tf.extractfile(f"{key}.cls").read())
        meta = json.loads(tf.extractfile(f"{key}.json").read())
        img = Image.open(io.BytesIO(tf.extractfile(f"{key}.png").read()))
    assert meta["label"] == cls and meta["label_name"] == str(cls) and meta["original_size"] == [8, 8]
    assert meta["source"] == "sklearn.datasets.load_digits" and isinstance(meta["index"], int)
    assert img.format == "PNG" and img.mode == "L" and img.size == (8, 8)

    # plain webdataset reads the same shards from S3 (boto3 streaming via gopen_schemes)
    import webdataset as wds

    register_webdataset_s3(s3.storage)
    train = open_manifest(digits_s3.out, s3.storage, "train")
    ds = wds.WebDataset(train.shard_urls, shardshuffle=False, empty_check=False)
    samples = list(ds)
    assert len(samples) == 1617 and len({s["__key__"] for s in samples}) == 1617
    assert all({"png", "cls", "json"} <= s.keys() for s in samples)
    assert all(int(s["cls"]) == json.loads(s["json"])["label"] for s in samples[:50])


def test_rerun_refuses_and_overwrite_replaces(s3):
    out = join_url(s3.root, "rerun")
    p = run_prepare_data("--out", out, "--shard-samples", "100", "--no-progress", env=s3.env)
    assert p.returncode == 0, p.stderr
    first = open_manifest(out, s3.storage, "train")
    assert len(first.shards) == 17

    p = run_prepare_data("--out", out, "--shard-samples", "500", "--no-progress", env=s3.env)
    assert p.returncode == 1
    assert "already holds a dataset" in p.stderr and "--overwrite" in p.stderr and out in p.stderr
    assert open_manifest(out, s3.storage, "train").shards == first.shards  # untouched

    p = run_prepare_data(
        "--out", out, "--shard-samples", "500", "--seed", "1", "--overwrite", "--no-progress", env=s3.env
    )
    assert p.returncode == 0, p.stderr
    second = open_manifest(out, s3.storage, "train")
    assert [s.samples for s in second.shards] == [500, 500, 500, 117]
    names = sorted(u.rsplit("/", 1)[-1] for u in list_urls(join_url(out, "train"), s3.storage))
    assert names == sorted([s.name for s in second.shards] + ["manifest.json"])  # no old shard left
    reader = ShardReader(DataConfig(url=out, loader_workers=0), s3.storage, batch_size=64)
    assert sum(len(b) for b in reader.iterate(0)) == 1617


def test_wrong_keys_and_missing_bucket_are_clear(s3):
    p = run_prepare_data("--out", "s3://ddpm-data/x", env={**s3.env, "AWS_ACCESS_KEY_ID": "NOSUCHKEY"})
    assert p.returncode == 1
    assert "refused the access keys" in p.stderr and s3.env["AWS_ENDPOINT_URL"] in p.stderr
    bucket = f"no-bucket-{uuid.uuid4().hex[:8]}"
    p = run_prepare_data("--out", f"s3://{bucket}/x", env=s3.env)
    assert p.returncode == 1 and bucket in p.stderr and "does not exist" in p.stderr


# ------------------------------------------------------------------------------------------------
# image folders


def test_image_folder_with_classes_round_trip(s3, tmp_path):
    root = tmp_path / "pics"
    save_image(root / "cats" / "red.png", Image.new("RGB", (20, 30), (255, 0, 0)), "PNG")
    save_image(root / "cats" / "wide.jpg", Image.new("RGB", (50, 40), (0, 0, 255)), "JPEG")
    rgba = Image.new("RGBA", (16, 16), (0, 255, 0, 255))
    save_image(root / "cats" / "alpha.png", rgba, "PNG")
    save_image(root / "dogs" / "gray.jpg", Image.new("L", (64, 64), 128), "JPEG")
    save_image(root / "dogs" / "tiny.png", Image.new("P", (10, 10)), "PNG")
    save_image(root / "dogs" / "deeper" / "nested.png", Image.new("RGB", (40, 20), (255, 255, 255)), "PNG")
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "dogs" / "notes.txt").write_text("not an image")
    out = join_url(s3.root, "folder")
    args = f"--source folder --folder {root} --out {out} --image-size 16 --channels 3 --eval-fraction 0 --engine local"
    p = run_prepare_data(*args.split(), "--no-progress", env=s3.env)
    assert p.returncode == 0, p.stderr
    assert "broken.jpg" in p.stderr and "1 unreadable file(s) skipped" in p.stderr
    m = open_manifest(out, s3.storage, "train")
    assert m.class_names == ["cats", "dogs"] and m.num_samples == 6 and m.channels == 3 and m.image_size == 16
    assert m.class_counts == [3, 3]
    assert not list(list_urls(join_url(out, "eval"), s3.storage))

    reader = ShardReader(DataConfig(url=out, image_size=16, channels=3, loader_workers=0), s3.storage, batch_size=4)
    batches = list(reader.iterate(0))
    images = torch.cat([b.images for b in batches])
    labels = torch.cat([b.labels for b in batches])
    assert images.shape == (6, 3, 16, 16) and sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    arrays = load_split_arrays(out, s3.storage, "train")
    with tarfile.open(fileobj=io.BytesIO(read_bytes(m.shard_url(0), s3.storage))) as tf:
        metas = {n.split(".")[0]: json.loads(tf.extractfile(n).read()) for n in tf.getnames() if n.endswith(".json")}
    by_path = {metas[k]["path"]: arrays.images[i] for i, k in enumerate(arrays.keys)}
    assert (by_path["cats/red.png"] == [255, 0, 0]).all()
    assert (by_path["cats/alpha.png"] == [0, 255, 0]).all()
    assert np.abs(by_path["cats/wide.jpg"].astype(int) - [0, 0, 255]).max() <= 8
    assert np.abs(by_path["dogs/gray.jpg"].astype(int) - 128).max() <= 2
    assert (by_path["dogs/deeper/nested.png"] == 255).all()
    assert {m["original_size"][0] for m in metas.values()} >= {20, 50, 64, 10, 40}
