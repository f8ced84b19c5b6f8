"""Shards made by other tools, indexed in place (pipeline.data.index) and read at another resolution
(pipeline.data.shards / reader); on local files (the S3 path: tests/integration/test_data.py)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from jobs import prepare_data
from pipeline.config import DataConfig
from pipeline.data import DataError, ShardError, ShardReader, load_split_arrays, open_manifest
from pipeline.data.index import index_dataset
from tests.unit.data.datasets import assert_no_image_byte_read, image_ranges, write_foreign_shards

SIZES = [23, 17, 30, 12]


def test_index_counts_samples_from_headers_and_reads_no_image_byte(tmp_path, index_reads):
    reads = index_reads
    shards = tmp_path / "shards"
    truth = write_foreign_shards(str(shards), None, SIZES, cls=True)
    m = index_dataset(str(shards), str(tmp_path / "ds"), None, log=lambda _: None)["train"]
    assert [s.samples for s in m.shards] == SIZES and m.num_samples == sum(SIZES)
    assert m.shard_urls == [str(shards / f"{i:05d}.tar") for i in range(4)]  # absolute: the manifest is elsewhere
    assert (m.image_size, m.channels, m.labels, m.indexed) == (None, None, "cls", True)
    assert "jpg" in m.members and m.class_counts == [sum(t["label"] == c for t in truth) for c in range(10)]
    assert all(s.sha256 == "" for s in m.shards) and all(s.bytes == (shards / s.name).stat().st_size for s in m.shards)
    # Not one byte of an image member was read, and at most one request per member.
    assert_no_image_byte_read(reads, lambda url: Path(url).read_bytes())
    images = sum(b - a for u in m.shard_urls for a, b in image_ranges(Path(u).read_bytes()))
    assert sum(n for _, _, n in reads) <= sum(s.bytes for s in m.shards) - images
    # A member costs at most three: its pax header (TarWriter writes them), its header, its data.
    assert len(reads) <= 3 * 4 * sum(SIZES)


def test_labels_from_a_json_field_and_a_seeded_split_of_whole_shards(tmp_path):
    shards = tmp_path / "shards"
    truth = write_foreign_shards(str(shards), None, SIZES)  # no .cls: img2dataset's members only
    out = tmp_path / "ds"
    got = index_dataset(str(shards), str(out), None, label_key="label", eval_fraction=0.25, checksums=True, log=print)
    train, ev = got["train"], got["eval"]
    assert len(ev.shards) == 1 and len(train.shards) == 3 and train.num_samples + ev.num_samples == sum(SIZES)
    assert train.labels == "json:label" and all(len(s.sha256) == 64 for s in train.shards)
    again = index_dataset(str(shards), str(tmp_path / "again"), None, label_key="label", eval_fraction=0.25, log=print)
    assert [s.name for s in again["eval"].shards] == [s.name for s in ev.shards]  # seeded
    # The reader streams the original shards at the size asked for, labels from the JSON field.
    arrays = load_split_arrays(str(out), None, "eval", image_size=12, channels=3)
    by_key = {t["key"]: t["label"] for t in truth}
    assert arrays.images.shape == (ev.num_samples, 12, 12, 3)
    assert [by_key[k] for k in arrays.keys] == arrays.labels.tolist()
    # Unlabelled without the key: every sample class 0.
    none = index_dataset(str(shards), str(tmp_path / "nolabels"), None, log=lambda _: None)["train"]
    assert none.labels == "none" and none.class_names == ["unlabelled"]


def test_training_batches_from_indexed_shards_random_crops_are_seeded(tmp_path):
    shards = tmp_path / "shards"
    write_foreign_shards(str(shards), None, SIZES, fmt="webp", cls=True)
    index_dataset(str(shards), str(tmp_path / "ds"), None, log=lambda _: None)
    cfg = DataConfig(url=str(tmp_path / "ds"), image_size=16, channels=3, resize="random", hflip=True, partitions=2)

    def first_batches():
        r = ShardReader(cfg, None, batch_size=16, seed=3)
        return [b for _, b in zip(range(3), r.iterate(0, 0), strict=False)]

    a, b = first_batches(), first_batches()
    assert a[0].images.shape[1:] == (3, 16, 16) and a[0].skipped == 0 and a[0].refilled == 0
    for x, y in zip(a, b, strict=True):
        assert x.keys == y.keys and np.array_equal(x.images.numpy(), y.images.numpy())
    other = ShardReader(cfg.model_copy(update={"resize": "center"}), None, batch_size=16, seed=3)
    c = next(iter(other.iterate(0, 0)))
    assert c.keys == a[0].keys and not np.array_equal(c.images.numpy(), a[0].images.numpy())


def test_resize_never_counts_or_refuses_other_sizes_naming_the_shard(tmp_path):
    shards = tmp_path / "shards"
    write_foreign_shards(str(shards), None, [10, 10], cls=True)
    index_dataset(str(shards), str(tmp_path / "ds"), None, log=lambda _: None)
    strict = DataConfig(url=str(tmp_path / "ds"), image_size=16, channels=3, resize="never", strict=True)
    with pytest.raises(ShardError, match=r"0000[01]\.tar: sample \d+: image is \d+x\d+, 16x16 .*data\.resize is never"):
        next(iter(ShardReader(strict, None, batch_size=4).iterate(0, 0)))
    lenient = strict.model_copy(update={"strict": False})
    with pytest.raises(DataError, match="no decodable sample"):  # every image has another size: nothing to train on
        next(iter(ShardReader(lenient, None, batch_size=4).iterate(0, 0)))


def test_bad_input_is_named(tmp_path, capsys):
    with pytest.raises(DataError, match="no .tar object"):
        index_dataset(str(tmp_path / "empty"), str(tmp_path / "ds"), None)
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    with pytest.raises(DataError, match=r"00000\.tar"):
        index_dataset(str(nothing / "{00000..00001}.tar"), str(tmp_path / "ds"), None)
    # Shards without an image member.
    texts = tmp_path / "texts"
    texts.mkdir()
    with tarfile.open(texts / "00000.tar", "w") as tf:
        tf.add(__file__, arcname="000000001.txt")
    with pytest.raises(DataError, match=r"no sample with an image member.*00000\.tar"):
        index_dataset(str(texts), str(tmp_path / "ds"), None)
    shards = tmp_path / "shards"
    write_foreign_shards(str(shards), None, [5], cls=True)
    with pytest.raises(DataError, match="--label-key caption.*00000.tar"):
        index_dataset(str(shards), str(tmp_path / "ds"), None, label_key="caption")
    # Through the job: exit 1 naming the object, and no manifest written.
    argv = ["--source", "webdataset", "--index-only", "--no-progress", "--out", str(tmp_path / "job")]
    assert prepare_data.main([*argv, "--shards", str(tmp_path / "empty")]) == 1
    assert str(tmp_path / "empty") in capsys.readouterr().err and not (tmp_path / "job").exists()
    assert prepare_data.main([*argv, "--shards", str(shards)]) == 0
    assert open_manifest(str(tmp_path / "job"), None, "train").num_samples == 5
    assert prepare_data.main([*argv, "--shards", str(shards)]) == 1  # --out holds a dataset now
    assert "already holds a dataset" in capsys.readouterr().err


def test_a_truncated_shard_is_named_not_counted_short(tmp_path):
    shards = tmp_path / "shards"
    write_foreign_shards(str(shards), None, [10, 10], cls=True)
    data = (shards / "00001.tar").read_bytes()
    (shards / "00001.tar").write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(DataError, match=r"00001\.tar: truncated"):
        index_dataset(str(shards), str(tmp_path / "ds"), None, log=lambda _: None)


def test_other_formats_need_the_shard_tasks():
    from pipeline.config import ConfigError
    from pipeline.data.prepare import PrepareDataSettings

    with pytest.raises(ConfigError, match="image_format: jpeg is written by the shard tasks"):
        PrepareDataSettings.from_cli(["--image-format", "jpeg"])  # the digits: the one-process converter
