"""Reading shards (pipeline.data.shards): tar decoding, validation against the manifest, bad data
skipped and counted or raised in strict mode, whole splits; on local datasets (no stack)."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import ShardError, ShardReader, load_split_arrays, open_manifest
from pipeline.data.shards import Shards, ShardSpec
from tests.unit.data.datasets import write_dataset


def rewrite_shard(path, edit) -> None:
    """Rewrite a tar shard member by member: ``edit(TarInfo, bytes)`` returns [(TarInfo, bytes), ...]."""
    with tarfile.open(path) as tf:
        members = [(ti, tf.extractfile(ti).read()) for ti in tf.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for ti, data in members:
            for new_ti, new_data in edit(ti, data):
                new_ti.size = len(new_data)
                tf.addfile(new_ti, io.BytesIO(new_data))


def shards_of(root, *, strict: bool = False) -> Shards:
    return Shards(ShardSpec.from_manifest(open_manifest(str(root), None, "train"), None, strict=strict))


def test_samples_and_decoding_match_the_written_images(tmp_path):
    manifest, truth = write_dataset(str(tmp_path), None, [30, 20])
    shards = shards_of(tmp_path)
    raws = list(shards.samples([1, 0]))
    assert len(raws) == 50 and raws[0].url == manifest.shard_url(1)  # in the order asked for
    for raw in raws:
        image, label = shards.decode(raw)
        assert image.shape == (8, 8, 1) and image.dtype == np.uint8 and label == truth[raw.key][0]
        assert np.array_equal(image[:, :, 0], np.asarray(Image.open(io.BytesIO(truth[raw.key][1]))))
    assert shards.take_events() == (0, ())


def test_bad_samples_are_skipped_counted_and_described(tmp_path):
    manifest, _ = write_dataset(str(tmp_path), None, [20, 20])
    keys = []

    def damage(ti, data):
        key, ext = ti.name.split(".", 1)
        if key not in keys:
            keys.append(key)
        if keys.index(key) == 2 and ext == "cls":  # sample 2: no class member
            return []
        if keys.index(key) == 5 and ext == "png":  # sample 5: two images
            return [(ti, data), (tarfile.TarInfo(ti.name), data)]
        if keys.index(key) == 7 and ext == "png":  # sample 7: not an image
            return [(ti, b"\x89PNG not really")]
        return [(ti, data)]

    rewrite_shard(tmp_path / "train" / manifest.shards[0].name, damage)
    shards = shards_of(tmp_path)
    raws = list(shards.samples([0]))
    assert len(raws) == 18 and {keys[2], keys[5]}.isdisjoint(r.key for r in raws)
    skipped, errors = shards.take_events()
    assert skipped == 2
    assert any("missing member(s)" in e and keys[2] in e for e in errors)
    assert any("duplicate member" in e and keys[5] in e for e in errors)
    assert any("content differs from the manifest" in e for e in errors)  # sha256 checked as it streams
    bad = next(r for r in raws if r.key == keys[7])
    assert "not a decodable PNG image" in shards.decode(bad)  # reported by whoever decodes it
    assert shards.take_events() == (0, ())

    with pytest.raises(ShardError, match=manifest.shards[0].name):
        list(shards_of(tmp_path, strict=True).samples([0]))


def test_truncated_and_missing_shards_count_every_lost_sample(tmp_path):
    manifest, _ = write_dataset(str(tmp_path), None, [40, 40, 40])
    first = tmp_path / "train" / manifest.shards[0].name
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    (tmp_path / "train" / manifest.shards[2].name).unlink()
    shards = shards_of(tmp_path)
    n = sum(1 for _ in shards.samples([0, 1, 2]))
    skipped, errors = shards.take_events()
    assert n + skipped == 120 and 40 < skipped < 40 + 40  # all of the missing one, part of the cut one
    assert any(manifest.shards[2].name in e and "40 of 40 samples lost" in e for e in errors)

    arrays = load_split_arrays(str(tmp_path), None, "train", strict=False)
    assert len(arrays.keys) == n and arrays.images.shape == (n, 8, 8, 1)
    with pytest.raises(ShardError):
        load_split_arrays(str(tmp_path), None, "train")  # strict by default


def test_samples_beyond_the_manifest_count_are_ignored_and_reported(tmp_path):
    write_dataset(str(tmp_path), None, [20, 20])
    path = tmp_path / "train" / "manifest.json"
    m = json.loads(path.read_text())
    m["shards"][0]["samples"], m["num_samples"] = 19, 39
    path.write_text(json.dumps(m))
    shards = shards_of(tmp_path)
    assert sum(1 for _ in shards.samples([0])) == 19
    skipped, errors = shards.take_events()
    assert skipped == 0 and "holds 20 samples, the manifest says 19" in errors[0]


def test_load_split_arrays_limit(tmp_path):
    _, truth = write_dataset(str(tmp_path), None, [30, 30])
    arrays = load_split_arrays(str(tmp_path), None, "train", limit=40)
    assert arrays.images.shape == (40, 8, 8, 1) and arrays.class_names == [str(i) for i in range(10)]
    assert [truth[k][0] for k in arrays.keys] == arrays.labels.tolist()


def test_decoders_never_unpickle(tmp_path):
    """Members other than the image and cls are never decoded (a .pyd would be unpickled by wds)."""

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    manifest, _ = write_dataset(str(tmp_path), None, [20, 20])
    evil = pickle.dumps(Boom())

    def add_pickles(ti, data):
        out = [(ti, data)]
        if ti.name.endswith(".png"):
            out += [(tarfile.TarInfo(ti.name.rsplit(".", 1)[0] + "." + ext), evil) for ext in ("pyd", "pth")]
        return out

    rewrite_shard(tmp_path / "train" / manifest.shards[0].name, add_pickles)
    reader = ShardReader(DataConfig(url=f"file://{tmp_path}", loader_workers=0), batch_size=8)
    n = sum(len(b) for b in reader.iterate(0))
    assert n == 40 and not (tmp_path / "pwned").exists()
