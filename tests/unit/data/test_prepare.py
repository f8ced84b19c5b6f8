"""Writing datasets (jobs/prepare_data.py, pipeline.data.prepare) into local directories: the
command line, sources and the split, shard cutting, image folders (no stack)."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
from PIL import Image

from jobs import prepare_data
from pipeline.data import load_split_arrays, open_manifest
from pipeline.data.sources import digits_source, split_items
from tests.unit.data.datasets import run_prepare_data, save_image

# ------------------------------------------------------------------------------------------------
# CLI


def test_help_lists_the_flags():
    p = run_prepare_data("--help")
    assert p.returncode == 0
    flags = "--source --folder --out --image-size --channels --shard-samples --shard-bytes --eval-fraction --seed"
    for flag in [*flags.split(), "--overwrite", "--dry-run", "--storage.endpoint-url"]:
        assert flag in p.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--channels", "2"], "channels"),
        (["--source", "folder"], "needs --folder"),
        (["--source", "folder", "--folder", "/no/such/dir"], "not a directory"),
        (["--eval-fraction", "1.5"], "eval_fraction"),
        (["--no-such-flag"], "unrecognized"),
    ],
)
def test_config_errors_exit_2(args, needle):
    p = run_prepare_data(*args)
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr


def test_dry_run_prints_the_config_and_writes_nothing(tmp_path):
    out = tmp_path / "ds"
    p = run_prepare_data("--out", str(out), "--dry-run", env={"AWS_SECRET_ACCESS_KEY": "s3cr3t-value"})
    assert p.returncode == 0, p.stderr
    heading, _, body = p.stdout.partition("\n")
    assert heading == "resolved configuration:"
    config = json.loads(body)
    assert config["out"] == str(out) and config["dry_run"] is True
    assert "s3cr3t-value" not in p.stdout + p.stderr
    assert "train 1617, eval 180" in p.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# sources and split (no storage)


def test_digits_source_is_the_real_sklearn_digits():
    from sklearn.datasets import load_digits

    src = digits_source()
    d = load_digits()
    assert len(src.items) == 1797 and src.class_names == [str(i) for i in range(10)]
    img = np.asarray(src.items[42].load())
    assert img.shape == (8, 8) and img.dtype == np.uint8
    assert np.array_equal(img, np.rint(d.images[42] * 255 / 16).astype(np.uint8))
    assert src.items[42].label == d.target[42]


def test_split_is_stratified_seeded_and_disjoint():
    items = digits_source().items
    train, evals = split_items(items, 0.1, seed=0)
    assert len(evals) == 180 and len(train) == 1617
    assert {i.key for i in train}.isdisjoint(i.key for i in evals)
    per_class = collections.Counter(i.label for i in evals)
    assert all(17 <= per_class[c] <= 19 for c in range(10))
    again, _ = split_items(items, 0.1, seed=0)
    other, _ = split_items(items, 0.1, seed=1)
    assert [i.key for i in again] == [i.key for i in train] and [i.key for i in other] != [i.key for i in train]
    train0, evals0 = split_items(items, 0.0, seed=0)
    assert len(train0) == 1797 and evals0 == []


def test_shards_are_cut_by_bytes_too(tmp_path):
    code = prepare_data.main(
        ["--out", str(tmp_path), "--shard-samples", "100000", "--shard-bytes", "200000", "--no-progress"]
    )
    assert code == 0
    m = open_manifest(str(tmp_path), None, "train")
    assert len(m.shards) > 5 and all(s.bytes <= 200_000 for s in m.shards)
    assert [(tmp_path / "train" / s.name).stat().st_size for s in m.shards] == [s.bytes for s in m.shards]
    assert sum(s.samples for s in m.shards) == m.num_samples == 1617


def test_rerun_refuses_and_overwrite_replaces_locally(tmp_path, capsys):
    assert prepare_data.main(["--out", str(tmp_path), "--shard-samples", "500", "--no-progress"]) == 0
    first = open_manifest(str(tmp_path), None, "train")
    assert prepare_data.main(["--out", str(tmp_path), "--no-progress"]) == 1
    assert "already holds a dataset" in capsys.readouterr().err
    assert open_manifest(str(tmp_path), None, "train").shards == first.shards
    assert prepare_data.main(["--out", str(tmp_path), "--shard-samples", "1000", "--overwrite", "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "manifest.json",
        "shard-000000.tar",
        "shard-000001.tar",
    ]


# ------------------------------------------------------------------------------------------------
# image folders


def test_flat_image_folder_is_one_class(tmp_path):
    root = tmp_path / "flat_pics"
    for i, size in enumerate([(12, 12), (30, 18), (9, 40)]):
        save_image(root / f"im{i}.png", Image.new("RGB", size, (10 * i, 20, 30)), "PNG")
    out = tmp_path / "out"
    args = f"--source folder --folder {root} --out {out} --image-size 8 --eval-fraction 0 --engine local --no-progress"
    code = prepare_data.main(args.split())
    assert code == 0
    m = open_manifest(str(out), None, "train")
    assert m.class_names == ["flat_pics"] and m.num_samples == 3 and m.channels == 1
    arrays = load_split_arrays(str(out), None, "train")
    assert arrays.images.shape == (3, 8, 8, 1) and set(arrays.labels.tolist()) == {0}


def test_folder_with_no_images_is_a_config_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    folder = str(tmp_path / "empty")
    p = run_prepare_data("--source", "folder", "--folder", folder, "--out", str(tmp_path / "o"), "--engine", "local")
    assert p.returncode == 2 and "no images found" in p.stderr
