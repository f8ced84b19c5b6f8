"""Writing a training dataset (``jobs/prepare_data.py``): an image source -> train/eval WebDataset
shards + manifests, on S3 or in a local directory.

``resolve`` reads the source and splits it (a source without images is a configuration error) and
says what will be written; ``run`` writes it. Output: ``<out>/train/`` and ``<out>/eval/`` (a seeded,
stratified held-out split), each with ``shard-NNNNNN.tar`` files and a ``manifest.json`` written
last. An output that already holds a dataset is refused unless ``overwrite``, which first deletes
the old manifests, then the old shards, so a dataset is never mixed.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, model_validator

from pipeline.config import ConfigError, JobSettings, StorageConfig
from pipeline.data import ingest
from pipeline.data.errors import DataError, DatasetExistsError, ManifestError
from pipeline.data.index import index_dataset
from pipeline.data.manifest import MANIFEST_NAME, Manifest, open_manifest
from pipeline.data.sources import (
    IMAGE_EXTENSIONS,
    Source,
    SourceItem,
    digits_source,
    encode_png,
    folder_source,
    prepare_image,
    split_items,
)
from pipeline.data.storage import check_bucket, delete_urls, join_url, list_urls
from pipeline.data.writer import SplitWriter

SPLITS = ("train", "eval")


@dataclass(frozen=True)
class DatasetPlan:
    source: Source
    splits: dict[str, list[SourceItem]]  # split -> its items, in write order


class PrepareDataSettings(JobSettings):
    """Write WebDataset shards (train + held-out eval split) with manifests, to S3 or a local directory."""

    source: Literal["digits", "folder", "webdataset"] = Field(
        "digits",
        description="digits: scikit-learn's bundled 8x8 handwritten digits; folder: your images (--folder); "
        "webdataset: existing WebDataset shards (--shards), re-encoded or, with --index-only, indexed in place",
    )
    folder: str | None = Field(
        None,
        description="with --source folder: a local folder or an s3://bucket/prefix of images, in class sub-folders "
        "(class = first path component under it) or flat",
    )
    shards: str | None = Field(
        None,
        description="with --source webdataset: the shards, as a brace pattern (s3://b/p/{00000..01023}.tar) or a "
        "prefix holding .tar files",
    )
    index_only: bool = Field(
        False,
        description="with --source webdataset: write only manifests for the shards where they are (nothing copied or "
        "decoded; read-only buckets work with --out elsewhere)",
    )
    checksums: bool = Field(False, description="with --index-only: record each shard's sha256 (reads every byte)")
    label_key: str | None = Field(
        None, description="with --source webdataset: the class is this field of each sample's .json member (or cls)"
    )
    image_format: Literal["png", "jpeg", "webp"] = Field("png", description="how images are stored in the shards")
    quality: int = Field(95, ge=1, le=100, description="JPEG / WebP quality (png: lossless)")
    engine: Literal["auto", "ray", "local"] = Field(
        "auto",
        description="ray: convert with Ray Data on the cluster (RAY_ADDRESS, else a local Ray); local: one process; "
        "auto: local for the digits, ray otherwise",
    )
    ray_cpus: int | None = Field(
        None,
        ge=1,
        description="with Ray: at most this many shard tasks at once, one CPU each (default: all the cluster's)",
    )
    out: str = Field("s3://ddpm-data/digits", description="dataset root: s3://bucket/prefix or a local directory")
    image_size: int = Field(8, ge=1, le=4096, description="output height = width (shorter side resized, center crop)")
    channels: int = Field(1, description="1: grayscale (L), 3: RGB")
    shard_samples: int = Field(256, ge=1, description="at most this many samples per shard")
    shard_bytes: int = Field(
        64 << 20, ge=10240, description="at most this many bytes per shard (tar overhead included)"
    )
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="held-out fraction (stratified by class, seeded)")
    seed: int = Field(0, description="seed of the train/eval split and of the sample order in the shards")
    overwrite: bool = Field(False, description="replace a dataset already at --out (old shards removed first)")
    progress: bool = Field(True, description="show a progress bar (tqdm, on stderr)")
    storage: StorageConfig = StorageConfig()
    _plan: DatasetPlan | ingest.Plan | None = PrivateAttr(None)  # set by resolve()

    @model_validator(mode="after")
    def _channels(self) -> PrepareDataSettings:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        return self

    @model_validator(mode="after")
    def _input_given(self) -> PrepareDataSettings:
        if self.source == "folder":
            if self.folder is None:
                raise ValueError("--source folder needs --folder PATH (a local folder or s3://bucket/prefix)")
            if "://" not in self.folder and not Path(self.folder).expanduser().is_dir():
                raise ValueError(f"folder: {self.folder} is not a directory")
        if self.source == "webdataset" and not self.shards:
            raise ValueError("--source webdataset needs --shards PATTERN_OR_PREFIX")
        if self.index_only and self.source != "webdataset":
            raise ValueError("--index-only indexes existing shards: use it with --source webdataset --shards ...")
        return self

    @model_validator(mode="after")
    def _format_needs_the_shard_tasks(self) -> PrepareDataSettings:
        if self.image_format != "png" and not ingests(self):
            raise ValueError(
                f"image_format: {self.image_format} is written by the shard tasks (--engine ray or auto, or an s3:// "
                "folder or WebDataset source); the one-process converter (the digits, --engine local) writes png"
            )
        return self

    @property
    def use_ray(self) -> bool:
        return self.engine == "ray" or (self.engine == "auto" and self.source != "digits")


def ingests(s: PrepareDataSettings) -> bool:
    """Converted by ``pipeline.data.ingest`` (Ray Data, or shard tasks in this process where today's
    converter cannot read the source: an s3:// folder, WebDataset shards); else the one-process converter."""
    if s.source == "digits" or s.index_only:
        return False
    return s.use_ray or s.source == "webdataset" or "://" in (s.folder or "")


def build_source(s: PrepareDataSettings) -> Source:
    if s.source == "digits":
        return digits_source()
    return folder_source(Path(s.folder).expanduser())


def resolve(s: PrepareDataSettings) -> None:
    """Read the source and split it, printing what will be written (also for a dry run).
    A source without images raises ConfigError: nothing could ever be written from it."""
    if ingests(s):
        s._plan = ingest.resolve(s)
        return
    if s.index_only:  # shards are listed when they are indexed
        print(f"source: the WebDataset shards {s.shards}, indexed in place -> manifests under {s.out}", file=sys.stderr)
        return
    source = build_source(s)
    for note in source.notes:
        print(f"note: {note}", file=sys.stderr)
    if not source.items:
        raise ConfigError(f"no images found in {s.folder} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    train, evals = split_items(source.items, s.eval_fraction, s.seed)
    print(
        f"source: {source.description}\n"
        f"classes: {len(source.class_names)}; train {len(train)}, eval {len(evals)} images; "
        f"{s.image_size}x{s.image_size}x{s.channels} -> {s.out}",
        file=sys.stderr,
    )
    s._plan = DatasetPlan(source, {"train": train, "eval": evals})


def existing_objects(out: str, storage: StorageConfig) -> list[str]:
    urls: list[str] = []
    for split in SPLITS:
        urls += list(list_urls(join_url(out, split), storage))
    return urls


def claim_output(s: PrepareDataSettings) -> None:
    """Refuse an ``--out`` that holds a dataset, or with ``--overwrite`` delete it (manifests first)."""
    check_bucket(s.out, s.storage)
    old = existing_objects(s.out, s.storage)
    if old:
        if not s.overwrite:
            raise DatasetExistsError(
                f"{s.out} already holds a dataset ({len(old)} object(s) under train/ and eval/, e.g. {old[0]}); "
                f"refusing to mix old and new shards: pass --overwrite to replace it, or choose another --out"
            )
        print(f"--overwrite: deleting {len(old)} old object(s) under {s.out}", file=sys.stderr)
        clear_output(s.storage, old)


def clear_output(storage: StorageConfig, urls: list[str]) -> None:
    """Manifests first (the dataset is then incomplete, never mixed), then everything else."""
    manifests = [u for u in urls if u.endswith("/" + MANIFEST_NAME)]
    delete_urls(manifests, storage)
    delete_urls([u for u in urls if u not in manifests], storage)


def write_split(
    s: PrepareDataSettings, source: Source, split: str, items: list[SourceItem], mtime: float
) -> tuple[Manifest | None, list[str]]:
    """Shards + manifest of one split; returns the manifest (None if no image was readable) and the
    unreadable files."""
    from tqdm import tqdm

    writer = SplitWriter(
        join_url(s.out, split),
        s.storage,
        split=split,
        image_size=s.image_size,
        channels=s.channels,
        class_names=source.class_names,
        source={
            **source.info,
            "description": source.description,
            "split_seed": s.seed,
            "eval_fraction": s.eval_fraction,
        },
        shard_samples=s.shard_samples,
        shard_bytes=s.shard_bytes,
        mtime=mtime,
    )
    unreadable: list[str] = []
    bar = tqdm(items, desc=f"{split}", unit="img", disable=not s.progress, file=sys.stderr, mininterval=0.5)
    for item in bar:
        try:
            img = item.load()
            original = [img.width, img.height]
            png = encode_png(prepare_image(img, s.image_size, s.channels))
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the job; reported below
            what = item.meta.get("path", item.key)
            unreadable.append(f"{what}: {type(e).__name__}: {e}")
            bar.write(f"skipping unreadable image {what}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        writer.add(item.key, png, item.label, {**item.meta, "original_size": original})
    bar.close()
    if writer.num_samples == 0:
        return None, unreadable
    return writer.finish(), unreadable


def run(s: PrepareDataSettings) -> int:
    """Write the dataset ``s`` describes (resolving it first if ``resolve`` has not). Returns 0.

    Raises DatasetExistsError if ``s.out`` holds a dataset and not ``s.overwrite``, DataError if no
    training image is readable, and the storage errors of ``pipeline.data.storage``."""
    t0 = time.time()
    if s.index_only:
        claim_output(s)
        index_dataset(
            s.shards,
            s.out,
            s.storage,
            label_key=s.label_key,
            checksums=s.checksums,
            eval_fraction=s.eval_fraction,
            seed=s.seed,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
        return 0
    if ingests(s):
        return ingest.run(s, s._plan)
    if s._plan is None:
        resolve(s)
    source, plan = s._plan.source, s._plan.splits
    claim_output(s)
    mtime = time.time()
    failures: list[str] = []
    summary = []
    for split in SPLITS:
        if not plan[split]:
            continue
        manifest, unreadable = write_split(s, source, split, plan[split], mtime)
        failures += unreadable
        if manifest is None:
            if split == "train":
                raise DataError(f"no readable image for the train split ({len(unreadable)} unreadable)")
            print("eval: no readable image; no eval split written", file=sys.stderr)
            continue
        summary.append(
            f"{split}: {manifest.num_samples} images in {len(manifest.shards)} shard(s), "
            f"{sum(x.bytes for x in manifest.shards) / 1e6:.2f} MB -> {manifest.url}"
        )
    for line in summary:
        print(line)
    if failures:
        print(f"{len(failures)} unreadable file(s) skipped:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
    print(f"done in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


def ensure_dataset(out: str, storage: StorageConfig) -> Manifest:
    """The train split's manifest at ``out``, writing the default dataset (digits) there first if it has none."""
    try:
        return open_manifest(out, storage, "train")
    except ManifestError:
        print(f"no dataset at {out}: writing the digits there", flush=True)
        run(PrepareDataSettings(out=out, storage=storage, progress=False))
        return open_manifest(out, storage, "train")
