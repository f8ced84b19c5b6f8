"""Ingestion with Ray Data (pipeline.data.ingest, `prepare_data --source folder|webdataset`) against the
real local stack: S3 for inputs and outputs, the stack's Ray for the shard tasks. Images of every kind
are made here (JPEG, PNG, WebP, grayscale, RGBA, 16-bit, CMYK, EXIF-rotated, truncated, zero bytes,
text named .jpg, too small); WebDataset shards are written with plain webdataset.TarWriter."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.data import open_manifest
from pipeline.data.ingest import PLAN_DIR
from pipeline.data.storage import join_url, list_urls, read_bytes, write_bytes
from tests.unit.data.datasets import REPO_ROOT, run_prepare_data, train_briefly, write_foreign_shards

pytestmark = pytest.mark.stack
EPOCH = {"SOURCE_DATE_EPOCH": "1700000000"}  # tar member times: shard bytes comparable across runs


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def variety() -> dict[str, bytes]:
    """rel path -> file bytes: nine usable images of every kind and four unusable files (+ a .txt)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # view rotated 90 degrees clockwise
    sideways = np.zeros((20, 40), np.uint8)
    sideways[:, 20:] = 255  # stored: left half black; upright: top half black
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    rgba = Image.new("RGBA", (24, 24), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 24, 12))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    full = encoded(noise, "JPEG")
    return {
        "cats/red.jpg": encoded(Image.new("RGB", (40, 30), (255, 0, 0)), "JPEG", quality=95),
        "cats/rotated.jpg": encoded(Image.fromarray(sideways), "JPEG", exif=exif.tobytes(), quality=95),
        "cats/alpha.png": encoded(rgba, "PNG"),
        "cats/cmyk.jpg": encoded(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95),
        "cats/deeper/blue.webp": encoded(Image.new("RGB", (30, 50), (0, 0, 255)), "WEBP", quality=95),
        "dogs/gray.png": encoded(Image.new("L", (20, 20), 77), "PNG"),
        "dogs/ramp16.png": encoded(Image.fromarray(ramp), "PNG"),
        "dogs/palette.gif": encoded(Image.new("P", (16, 16), 3), "GIF"),
        "dogs/noise.jpg": full,
        "dogs/truncated.jpg": full[: len(full) // 3],
        "dogs/zero.jpg": b"",
        "dogs/text.jpg": b"this is a text file, not a jpeg\n",
        "dogs/tiny.png": encoded(Image.new("RGB", (4, 4)), "PNG"),
        "dogs/readme.txt": b"ignored: not an image extension",
    }


def samples_of(out: str, storage, split: str) -> dict[str, dict]:
    """path (or shard key) -> {"meta", "image" (PIL), "cls", "ext"} of every sample in a split."""
    m = open_manifest(out, storage, split)
    got: dict[str, dict] = {}
    for url in m.shard_urls:
        by_key: dict[str, dict] = {}
        with tarfile.open(fileobj=io.BytesIO(read_bytes(url, storage))) as tf:
            for member in tf.getmembers():
                key, ext = member.name.split(".", 1)
                by_key.setdefault(key, {"key": key})[ext] = tf.extractfile(member).read()
        for key, s in by_key.items():
            meta = json.loads(s["json"])
            ext = next(e for e in ("png", "jpg", "webp") if e in s)
            img = Image.open(io.BytesIO(s[ext]))
            img.load()
            got[meta.get("path") or meta["key"]] = {
                "meta": meta,
                "image": img,
                "cls": int(s["cls"]),
                "ext": ext,
                "key": key,
            }
    return got


@pytest.fixture(scope="module")
def images_s3(s3):
    src = join_url(s3.root, "images")
    for rel, data in variety().items():
        write_bytes(join_url(src, rel), data, s3.storage)
    return src


def test_folder_on_s3_converts_every_kind_and_counts_what_it_skips(s3, images_s3):
    out = join_url(s3.root, "variety")
    args = f"--source folder --folder {images_s3} --out {out} --image-size 16 --channels 3 --eval-fraction 0"
    p = run_prepare_data(*args.split(), "--ray-cpus", "1", "--no-progress", env=s3.env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Ray Data" in p.stderr and "ingested 9 images" in p.stdout
    m = open_manifest(out, s3.storage, "train")
    assert m.class_names == ["cats", "dogs"] and m.class_counts == [5, 4] and m.num_samples == 9
    assert m.skipped == {"empty": 1, "not_an_image": 1, "too_small": 1, "truncated": 1}
    assert "skipped: empty 1, not_an_image 1, too_small 1, truncated 1" in p.stdout
    for name in ("zero.jpg", "text.jpg", "truncated.jpg", "tiny.png"):
        assert name in p.stderr
    assert not list(list_urls(join_url(out, PLAN_DIR), s3.storage))  # nothing left of the run's plan

    got = samples_of(out, s3.storage, "train")
    assert all(g["image"].size == (16, 16) and g["image"].mode == "RGB" and g["ext"] == "png" for g in got.values())
    px = {k: np.asarray(g["image"]).astype(int) for k, g in got.items()}
    rotated = px["cats/rotated.jpg"].mean(axis=-1)
    assert rotated[:6].mean() < 40 and rotated[-6:].mean() > 215  # EXIF applied: the black half is on top
    assert got["cats/rotated.jpg"]["meta"]["original_size"] == [40, 20]
    assert np.abs(px["cats/red.jpg"] - [255, 0, 0]).max() <= 10
    assert np.abs(px["cats/cmyk.jpg"] - [255, 0, 0]).max() <= 12  # CMYK converted
    alpha = px["cats/alpha.png"]  # opaque blue above, transparent red below: composited over white
    assert np.abs(alpha[:5] - [0, 0, 255]).max() <= 3 and alpha[-5:].min() >= 252
    assert np.abs(px["cats/deeper/blue.webp"] - [0, 0, 255]).max() <= 10
    assert (px["dogs/gray.png"] == 77).all()
    ramp = px["dogs/ramp16.png"][..., 0]
    assert ramp.min() <= 10 and ramp.max() >= 245 and (ramp < 128).mean() == pytest.approx(0.5, abs=0.1)  # scaled
    assert {g["cls"] for k, g in got.items() if k.startswith("dogs/")} == {1}

    p = run_prepare_data(*args.split(), "--engine", "local", "--no-progress", env=s3.env)
    assert p.returncode == 1 and "already holds a dataset" in p.stderr and "--overwrite" in p.stderr and out in p.stderr


def test_split_and_shards_identical_at_1_and_2_cpus(s3, tmp_path):
    root = tmp_path / "pics"
    rng = np.random.default_rng(1)
    for c in ("a", "b", "c"):
        for i in range(9):
            img = Image.fromarray(rng.integers(0, 255, (24, 20 + i, 3), dtype=np.uint8))
            (root / c).mkdir(parents=True, exist_ok=True)
            img.save(root / c / f"{i}.jpg", quality=90)
    (root / "c" / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    runs = {}
    for cpus in (1, 2):
        out = join_url(s3.root, f"split-{cpus}")
        args = f"--source folder --folder {root} --out {out} --image-size 8 --eval-fraction 0.3 --shard-samples 4"
        p = run_prepare_data(
            *args.split(), "--ray-cpus", str(cpus), "--no-progress", env={**s3.env, **EPOCH}, timeout=300
        )
        assert p.returncode == 0, p.stderr
        runs[cpus] = {split: open_manifest(out, s3.storage, split) for split in ("train", "eval")}
    one, two = runs[1], runs[2]
    for split in ("train", "eval"):
        assert [(s.name, s.samples, s.sha256) for s in one[split].shards] == [
            (s.name, s.samples, s.sha256) for s in two[split].shards
        ]
        assert one[split].class_counts == two[split].class_counts and one[split].skipped == two[split].skipped
    # 28 files listed, 8 (30%) held out stratified (3 classes: 2-3 each), the broken file skipped where it fell
    assert one["train"].num_samples + one["eval"].num_samples == 27
    assert sum(one["train"].skipped.values()) + sum(one["eval"].skipped.values()) == 1
    assert one["eval"].num_samples + sum(one["eval"].skipped.values()) == 8 and min(one["eval"].class_counts) >= 2
    keys = {split: set(samples_of(join_url(s3.root, "split-2"), s3.storage, split)) for split in ("train", "eval")}
    assert keys["train"].isdisjoint(keys["eval"]) and len(keys["train"] | keys["eval"]) == 27


def test_killed_ingestion_leaves_no_manifest_and_a_rerun_completes(s3, tmp_path):
    root = tmp_path / "many"
    rng = np.random.default_rng(2)
    for i in range(300):
        (root / f"k{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(root / f"k{i % 3}" / f"{i}.png")
    out = join_url(s3.root, "killed")
    args = [
        *f"--source folder --folder {root} --out {out} --image-size 32 --channels 3 --shard-samples 5".split(),
        *("--ray-cpus", "1", "--no-progress"),
    ]
    cmd = [sys.executable, str(REPO_ROOT / "jobs" / "prepare_data.py"), *args]
    proc = subprocess.Popen(
        cmd, env={**os.environ, **s3.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    done_prefix = join_url(out, PLAN_DIR, "done")
    deadline = time.monotonic() + 240
    try:
        while len(list(list_urls(done_prefix, s3.storage))) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no shard task finished in time"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    written = [u for u in list_urls(out, s3.storage) if u.endswith(".tar")]
    assert written and len(written) < 60  # killed mid-run
    assert not [u for u in list_urls(out, s3.storage) if u.endswith("/manifest.json")]  # nothing visible

    p = run_prepare_data(*args, env=s3.env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "continuing the unfinished ingestion" in p.stderr and "kept from the unfinished run" in p.stdout
    train, evals = open_manifest(out, s3.storage, "train"), open_manifest(out, s3.storage, "eval")
    assert (train.num_samples, evals.num_samples) == (270, 30) and len(train.shards) == 54
    keys = set(samples_of(out, s3.storage, "train")) | set(samples_of(out, s3.storage, "eval"))
    assert len(keys) == 300
    assert not list(list_urls(join_url(out, PLAN_DIR), s3.storage))


def test_webdataset_shards_in_img2dataset_layout_are_re_encoded_with_a_label_key(s3):
    src = join_url(s3.root, "foreign")
    truth = {t["key"]: t for t in write_foreign_shards(src, s3.storage, [30, 30, 25])}
    out = join_url(s3.root, "reencoded")
    pattern = join_url(src, "{00000..00002}.tar")
    args = f"--source webdataset --shards {pattern} --label-key label --out {out} --image-size 16 --channels 3"
    p = run_prepare_data(
        *args.split(), "--image-format", "webp", "--eval-fraction", "0.2", "--no-progress", env=s3.env, timeout=300
    )
    assert p.returncode == 0, p.stderr
    train, evals = open_manifest(out, s3.storage, "train"), open_manifest(out, s3.storage, "eval")
    assert train.num_samples + evals.num_samples == 85 and evals.num_samples == 17
    assert train.class_names == [str(c) for c in range(10)] and "webp" in train.members
    got = samples_of(out, s3.storage, "train") | samples_of(out, s3.storage, "eval")
    assert set(got) == set(truth)
    for key, g in got.items():
        assert g["cls"] == truth[key]["label"] and g["meta"]["shard"] == truth[key]["url"]
        assert g["ext"] == "webp" and g["image"].size == (16, 16) and g["image"].mode == "RGB"
        assert g["meta"]["original_size"] == list(truth[key]["size"])
    result, reports = train_briefly(out, s3.storage, "--data.image-size", "16", "--data.channels", "3")
    assert result["steps"] >= 6 and any(np.isfinite(r.get("val_loss", np.nan)) for r in reports)


# ------------------------------------------------------------------------------------------------
# bad input (in this process: --engine local runs the same shard tasks without Ray)


def test_bad_inputs_exit_non_zero_naming_the_object(s3, images_s3):
    local = ("--engine", "local", "--no-progress")
    out = join_url(s3.root, "bad-out")
    nothing = join_url(s3.root, "nothing-here")
    p = run_prepare_data("--source", "folder", "--folder", nothing, "--out", out, *local, env=s3.env)
    assert p.returncode == 2 and nothing in p.stderr and "nothing there" in p.stderr

    texts = join_url(s3.root, "only-text")
    write_bytes(join_url(texts, "a", "notes.txt"), b"x", s3.storage)
    p = run_prepare_data("--source", "folder", "--folder", texts, "--out", out, *local, env=s3.env)
    assert p.returncode == 2 and "no images among" in p.stderr and join_url(texts, "a", "notes.txt") in p.stderr

    missing = join_url(s3.root, "no-shards", "{00000..00001}.tar")
    p = run_prepare_data("--source", "webdataset", "--shards", missing, "--out", out, *local, env=s3.env)
    assert p.returncode == 1 and join_url(s3.root, "no-shards", "00000.tar") in p.stderr

    from webdataset import TarWriter

    buf = io.BytesIO()
    with TarWriter(buf, encoder=False) as tw:
        tw.write({"__key__": "000000001", "txt": b"a caption", "json": b'{"label": 1}'})
    captions = join_url(s3.root, "captions-only", "00000.tar")
    write_bytes(captions, buf.getvalue(), s3.storage)
    p = run_prepare_data(
        "--source", "webdataset", "--shards", join_url(s3.root, "captions-only"), "--out", out, *local, env=s3.env
    )
    assert p.returncode == 1 and captions in p.stderr and "no sample with an image member" in p.stderr
    assert not list(list_urls(out, s3.storage))  # nothing written for any of them
